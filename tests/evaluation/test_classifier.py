"""The FashionMNIST classifier behind `fmnist` features: the shipped weights, its input, its training command."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_synthetic_fashion_mnist
from ddpm_fashion.cli import main
from ddpm_fashion.data import CLASS_NAMES, load_fashion_mnist
from ddpm_fashion.evaluation import classifier, classifier_training

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shipped():
    """The classifier that ships inside the package."""
    return classifier.load_classifier()


def test_shipped_classifier_reaches_the_required_test_accuracy(shipped, real_data_dir):
    images, labels = load_fashion_mnist("test", real_data_dir)
    measured = classifier.accuracy(shipped, images, labels)
    assert measured >= classifier.REQUIRED_ACCURACY
    # The record beside the weights must describe these weights, not an earlier run.
    record = json.loads((classifier.WEIGHTS_DIR / classifier.METADATA_FILE).read_text())
    assert record["test_accuracy"] == pytest.approx(measured, abs=2e-3)


def test_shipped_classifier_is_a_one_channel_ten_class_safetensors_model(shipped):
    assert shipped.config.num_channels == 1
    assert [shipped.config.id2label[index] for index in range(len(CLASS_NAMES))] == list(CLASS_NAMES)
    assert not shipped.training
    assert sorted(path.name for path in classifier.WEIGHTS_DIR.iterdir()) == [
        "config.json", classifier.WEIGHTS_FILE, classifier.METADATA_FILE]
    weights = load_file(classifier.WEIGHTS_DIR / classifier.WEIGHTS_FILE)
    assert sum(tensor.numel() for tensor in weights.values()) < 2_000_000  # "a few MB at most"


def test_features_and_logits_agree_with_the_model_forward(shipped):
    images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    features, logits = classifier.features_and_logits(shipped, images)
    with torch.no_grad():
        expected = shipped(pixel_values=classifier.to_pixel_values(images)).logits
    assert features.shape == (8, shipped.config.hidden_sizes[-1])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(classifier.predict(shipped, images, batch_size=3), expected.argmax(-1), rtol=0, atol=0)


def test_pixel_values_are_the_same_for_uint8_and_unit_float_images():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    from_uint8 = classifier.to_pixel_values(images)
    from_float = classifier.to_pixel_values(images.unsqueeze(1).float() / 255)
    assert from_uint8.shape == (4, 1, 28, 28)
    torch.testing.assert_close(from_uint8, from_float, rtol=0, atol=1e-6)
    assert from_uint8.min() >= -1 and from_uint8.max() <= 1
    assert classifier.to_pixel_values(torch.full((1, 28, 28), 255, dtype=torch.uint8)).unique().tolist() == [1.0]


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 28, 28), torch.zeros(2, 1, 32, 32), torch.zeros(28, 28),
                                 torch.zeros(2, 1, 28, 28, dtype=torch.int64)])
def test_pixel_values_refuse_other_shapes_and_types(bad):
    with pytest.raises(ValueError, match="classifier input must be"):
        classifier.to_pixel_values(bad)


def test_augment_mirrors_and_shifts_each_image_by_at_most_two_pixels():
    images = torch.zeros(512, 28, 28, dtype=torch.uint8)
    images[:, 10, 5] = 255  # one lit pixel, off the vertical axis so that mirroring moves it
    augmented = classifier_training.augment(images, torch.Generator().manual_seed(0))
    assert augmented.dtype == torch.uint8 and augmented.shape == images.shape
    lit = augmented.nonzero()  # [512, 3]: every image still has exactly its one pixel
    assert len(lit) == 512 and torch.equal(lit[:, 0], torch.arange(512))
    rows, cols = lit[:, 1], lit[:, 2]
    assert ((rows - 10).abs() <= classifier_training.MAX_SHIFT).all()
    mirrored = (cols - (27 - 5)).abs() <= classifier_training.MAX_SHIFT
    assert (mirrored | ((cols - 5).abs() <= classifier_training.MAX_SHIFT)).all()
    assert 0.4 < mirrored.float().mean() < 0.6  # about half are mirrored
    assert len(rows.unique()) == 2 * classifier_training.MAX_SHIFT + 1  # every shift occurs


def test_train_classifier_command_saves_a_loadable_model_and_its_record(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    data_dir = write_synthetic_fashion_mnist(tmp_path / "data", num_train=2 * classifier_training.BATCH_SIZE,
                                             num_test=40)
    out = tmp_path / "classifier"
    code = main(["train-classifier", "--out", str(out), "--epochs", "1", "--data_dir", data_dir, "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "test accuracy" in captured.out
    record = json.loads((out / classifier.METADATA_FILE).read_text())
    assert record["epochs"] == 1 and record["seed"] == 0
    assert 0 <= record["test_accuracy"] <= 1 and record["train_seconds"] > 0
    assert record["command"].startswith("ddpm-fashion train-classifier --out")
    model = classifier.load_classifier(out)
    test_images, test_labels = load_fashion_mnist("test", data_dir)
    assert classifier.accuracy(model, test_images, test_labels) == pytest.approx(record["test_accuracy"], abs=1e-6)
    assert not any(path.name.startswith(".") for path in out.iterdir())  # no staging left behind


def test_training_is_reproducible_from_its_seed(tmp_path):
    data_dir = write_synthetic_fashion_mnist(tmp_path, num_train=classifier_training.BATCH_SIZE, num_test=10)
    first, _ = classifier_training.train_classifier(1, data_dir, seed=3, progress=False)
    second, _ = classifier_training.train_classifier(1, data_dir, seed=3, progress=False)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("out, epochs, message", [
    ("missing-parent/classifier", "1", "does not exist"),
    ("classifier", "0", "must be a positive integer"),
])
def test_train_classifier_command_refuses_bad_input_before_training(out, epochs, message, tmp_path, capsys):
    code = main(["train-classifier", "--out", str(tmp_path / out), "--epochs", epochs, "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / out).exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    existing = tmp_path / "file"
    existing.write_text("")
    code = main(["train-classifier", "--out", str(existing), "--epochs", "1", "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "not a directory" in err and len(err.strip().splitlines()) == 1
    assert existing.read_text() == ""


def test_train_classifier_refuses_bad_epochs_and_seed():
    with pytest.raises(ValueError, match="epochs"):
        classifier_training.train_classifier(0)
    with pytest.raises(ValueError, match="seed"):
        classifier_training.train_classifier(1, seed=-1)


def test_missing_classifier_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        classifier.load_classifier(tmp_path)


# ---- the shipped classifier is never replaced; --out appears only when the model is saved ----------------------

def _snapshot_shipped():
    return {path.name: path.read_bytes() for path in classifier.WEIGHTS_DIR.iterdir()}


def test_default_out_is_a_new_folder_in_the_working_directory_not_the_shipped_weights():
    from ddpm_fashion.cli import build_parser

    args = build_parser().parse_args(["train-classifier"])
    assert args.out == "fmnist-classifier"
    assert not classifier.WEIGHTS_DIR.resolve().is_relative_to(Path(args.out).resolve())


@pytest.mark.parametrize("out", [classifier.WEIGHTS_DIR, classifier.SHIPPED_WEIGHTS,
                                 classifier.WEIGHTS_DIR / "retrained"])
def test_out_in_the_shipped_weights_is_refused_before_training(out, tmp_path, capsys, monkeypatch):
    before = _snapshot_shipped()
    monkeypatch.setattr(classifier_training, "train_classifier", lambda *a, **k: pytest.fail("trained"))
    code = main(["train-classifier", "--out", str(out), "--epochs", "1", "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "would overwrite" in err and "ships with ddpm_fashion" in err
    assert _snapshot_shipped() == before and not (classifier.WEIGHTS_DIR / "retrained").exists()


def test_an_existing_non_empty_out_is_refused_and_left_alone(tmp_path, capsys, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    monkeypatch.setattr(classifier_training, "train_classifier", lambda *a, **k: pytest.fail("trained"))
    code = main(["train-classifier", "--out", str(out), "--epochs", "1", "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is not empty" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]


def test_a_split_smaller_than_one_batch_is_refused_and_nothing_is_created(tmp_path, capsys):
    data_dir = write_synthetic_fashion_mnist(tmp_path, num_train=100, num_test=20)
    out = tmp_path / "classifier"
    code = main(["train-classifier", "--out", str(out), "--epochs", "1", "--data_dir", data_dir, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the training split has 100 images, fewer than one batch of 128" in err and "no optimizer step" in err
    assert not out.exists() and not any(path.name.startswith(".") for path in tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--seed", "99999999999999999999"], "argument --seed: must be an integer from 0 to 4294967295"),
    (["--seed", "-3"], "argument --seed: must be an integer from 0 to 4294967295"),
    (["--data_dir", "nowhere"], "data_dir"),
])
def test_bad_seed_or_data_leave_no_out_folder_behind(argv, message, tmp_path, capsys):
    out = tmp_path / "classifier"
    code = main(["train-classifier", "--out", str(out), "--epochs", "1", "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_training_leaves_no_out_folder_behind(tmp_path, capsys, monkeypatch):
    data_dir = write_synthetic_fashion_mnist(tmp_path, num_train=classifier_training.BATCH_SIZE, num_test=10)
    out = tmp_path / "classifier"

    def fail(*args, **kwargs):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(classifier_training, "augment", fail)
    code = main(["train-classifier", "--out", str(out), "--epochs", "1", "--data_dir", data_dir, "--quiet"])
    assert code == 2 and "broken on purpose" in capsys.readouterr().err
    assert not out.exists() and not any(path.name.startswith(".") for path in tmp_path.iterdir())
