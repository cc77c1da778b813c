"""Every command's outputs: a new file, never one of a model's, run's or checkpoint's own files nor the shipped
weights, and one line naming it when it cannot be written (an existing file, a link, a long name, a folder that is a
file, a full disk), before any work where that can be known."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, SIZE, copy_model, fill_disk, mounted_tmpfs, run_cli, snapshot, write_synthetic_fashion_mnist
from ddpm_fashion.commands import sample as sample_command
from ddpm_fashion.sampling import generate, own_vs_library

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- the model a command reads, and the shipped weights ------------------------------------------------------

SHIPPED_WEIGHTS = ROOT / "ddpm_fashion" / "weights"
PROTECTED_OUTPUTS = {
    "compare --json the index": lambda m: ["compare", "--model", m, "--json", m / "model_index.json"],
    "compare --out the samples picture": lambda m: ["compare", "--model", m, "--out", m / "samples.png"],
    "compare --json in unet/": lambda m: ["compare", "--model", m, "--json", m / "unet" / "config.json"],
    "sample --out the samples picture": lambda m: ["sample", "--model", m, "--out", m / "samples.png"],
    "sample --out the loss curve": lambda m: ["sample", "--model", m, "--out", m / "loss.png"],
    "sample --gif inside scheduler/": lambda m: ["sample", "--model", m, "--gif", m / "scheduler" / "r.gif"],
    "evaluate --json the index": lambda m: ["evaluate", "--model", m, "--json", m / "model_index.json"],
    "evaluate --samples_file the weights": lambda m: ["evaluate", "--model", m, "--samples_file",
                                                      m / "unet" / "diffusion_pytorch_model.safetensors"],
    "sample --out into the shipped weights": lambda m: ["sample", "--model", m, "--out", SHIPPED_WEIGHTS / "x.png"],
    "forward --out into the shipped weights": lambda m: ["forward", "--out", SHIPPED_WEIGHTS / "fmnist_classifier"
                                                         / "x.png"],
    "evaluate real-train --json into the shipped weights": lambda m: [
        "evaluate", "--model", "real-train", "--json", SHIPPED_WEIGHTS / "fmnist_classifier" / "config.json"],
}


@pytest.mark.parametrize("case", PROTECTED_OUTPUTS)
def test_no_output_may_replace_a_file_of_the_model_or_the_shipped_weights(model_dir, tmp_path, capsys, monkeypatch,
                                                                          case):
    model = copy_model(model_dir, tmp_path)
    (model / "samples.png").write_bytes(b"the trainer's samples")
    (model / "loss.png").write_bytes(b"the trainer's loss curve")
    monkeypatch.chdir(tmp_path)  # default outputs (forward.png, samples.png) land here, not in the repository
    model_before, shipped_before = snapshot(model), snapshot(SHIPPED_WEIGHTS)
    argv = PROTECTED_OUTPUTS[case](model) + ["--num_inference_steps" if "forward" not in case else "--dpi", 20]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and "would overwrite" in stderr and "Traceback" not in stderr, stderr
    assert snapshot(model) == model_before and snapshot(SHIPPED_WEIGHTS) == shipped_before
    assert sorted(os.listdir(tmp_path)) == ["model"]  # nothing written anywhere


def test_a_new_picture_beside_the_model_is_fine(model_dir, tmp_path, capsys):
    model = copy_model(model_dir, tmp_path)
    before = snapshot(model)
    code, _, stderr = run_cli(["sample", "--model", model, "--num_inference_steps", 2, "--num_images", 2,
                               "--out", model / "my-samples.png"], capsys)
    assert code == 0, stderr
    assert set(snapshot(model)) == set(before) | {Path("my-samples.png")}


def test_an_output_that_is_a_link_to_a_model_file_is_refused(model_dir, tmp_path, capsys):
    model = copy_model(model_dir, tmp_path)
    link = tmp_path / "report.json"
    link.symlink_to(model / "model_index.json")
    before = snapshot(model)
    code, _, stderr = run_cli(["compare", "--model", model, "--json", link, "--num_inference_steps", 2], capsys)
    assert code == 2 and "would overwrite" in stderr and stderr.count("\n") == 1, stderr
    assert snapshot(model) == before and link.is_symlink()


# ---- every output: new, outside every model folder's own files, and one line naming it when it cannot be written --


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts its work (generate, data, scoring, training) before refusing an output."""
    from ddpm_fashion import data
    from ddpm_fashion.evaluation import classifier_training, sample_quality

    def fail(*args, **kwargs):
        pytest.fail("the command started working before it refused its output")

    for module, name in [(generate, "denoise"), (own_vs_library, "denoise"), (sample_quality, "Evaluator"),
                         (sample_quality, "real_training_images"), (data, "load_fashion_mnist"),
                         (classifier_training, "train_classifier")]:
        monkeypatch.setattr(module, name, fail)


def _other_model_and_run(model_dir, tmp_path):
    """A second saved pipeline B (with the trainer's pictures), and a run folder R with logs and a checkpoint."""
    from ddpm_fashion.training import run_dir

    other = copy_model(model_dir, tmp_path, "B")
    (other / "samples.png").write_bytes(b"the trainer's samples")
    (other / "loss.png").write_bytes(b"the trainer's loss curve")
    run = tmp_path / "R"
    checkpoint = run / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    run_dir.write_manifest(checkpoint)
    (checkpoint / "notes").mkdir()
    (run / "logs").mkdir()
    run_dir.mark_as_run(run)
    return other, run


def _read_and_write(m, command, option, target):
    """The argv of `command` (reading model m where it reads one) writing `option target`."""
    model = ["--model", m, "--num_inference_steps", 2]
    reads = {"sample": model, "compare": model, "evaluate": model, "evaluate real-train": ["--model", "real-train"],
             "forward": ["--dpi", 20], "train-classifier": ["--epochs", 1]}[command]
    return [command.split()[0], *reads, option, target]


OTHER_MODEL_OUTPUTS = {
    "compare --json B's index": ("compare", "--json", "B/model_index.json"),
    "compare --json in B's unet/": ("compare", "--json", "B/unet/config.json"),
    "compare --out B's samples": ("compare", "--out", "B/samples.png"),
    "evaluate --json B's index": ("evaluate", "--json", "B/model_index.json"),
    "evaluate --json in B's unet/": ("evaluate", "--json", "B/unet/config.json"),
    "evaluate real-train --json B's index": ("evaluate real-train", "--json", "B/model_index.json"),
    "evaluate real-train --json in B's unet/": ("evaluate real-train", "--json", "B/unet/config.json"),
    "evaluate --samples_file B's weights": ("evaluate", "--samples_file",
                                            "B/unet/diffusion_pytorch_model.safetensors"),
    "sample --out B's loss curve": ("sample", "--out", "B/loss.png"),
    "sample --gif in B's scheduler/": ("sample", "--gif", "B/scheduler/r.gif"),
    "forward --out in R's logs/": ("forward", "--out", "R/logs/f.png"),
    "compare --json R's marker": ("compare", "--json", "R/ddpm_fashion_run.json"),
    "sample --out in a checkpoint": ("sample", "--out", "R/checkpoints/checkpoint-2/s.png"),
    "compare --json deep in a checkpoint": ("compare", "--json", "R/checkpoints/checkpoint-2/notes/r.json"),
    "evaluate --json in R's checkpoints/": ("evaluate", "--json", "R/checkpoints/r.json"),
    "train-classifier --out in B's unet/": ("train-classifier", "--out", "B/unet/classifier"),
    "train-classifier --out in a checkpoint": ("train-classifier", "--out", "R/checkpoints/checkpoint-2/classifier"),
}


@pytest.mark.parametrize("case", OTHER_MODEL_OUTPUTS)
def test_no_output_may_go_into_the_files_of_any_model_run_or_checkpoint_folder(model_dir, tmp_path, capsys,
                                                                                monkeypatch, no_work, case):
    """Not only the model a command reads: any folder above the output holding model_index.json, a run marker or a
    checkpoint manifest keeps its own entries (and a checkpoint all of itself)."""
    command, option, target = OTHER_MODEL_OUTPUTS[case]
    _other_model_and_run(model_dir, tmp_path)
    model = copy_model(model_dir, tmp_path, "A")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, stdout, stderr = run_cli(_read_and_write(model, command, option, target), capsys)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr and stdout == "", stderr
    expected = ("lies inside the checkpoint" if "checkpoint-2" in target else "would overwrite")
    assert stderr.startswith(f"ddpm-fashion {command.split()[0]}: error: ") and expected in stderr, stderr
    assert f" {target} " in stderr and "give a path outside it" in stderr, stderr
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["A", "B", "R"]


def test_a_new_report_beside_another_model_is_written_and_never_replaced(model_dir, tmp_path, capsys):
    other, _ = _other_model_and_run(model_dir, tmp_path)
    before = snapshot(other)
    argv = ["compare", "--model", model_dir, "--num_inference_steps", 2, "--num_images", 2, "--json",
            other / "eval.json"]
    code, _, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    report = (other / "eval.json").read_bytes()
    assert json.loads(report)["settings"]["num_images"] == 2
    assert set(snapshot(other)) == set(before) | {Path("eval.json")}
    code, _, stderr = run_cli(argv[:-1] + [other / "eval.json"], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"output {other / 'eval.json'} exists; give a new name or delete it first" in stderr
    assert (other / "eval.json").read_bytes() == report


EXISTING_OUTPUTS = {
    "sample --out": ("sample", "--out", "mine.png"),
    "sample --gif": ("sample", "--gif", "mine.gif"),
    "compare --json": ("compare", "--json", "mine.json"),
    "compare --out": ("compare", "--out", "mine.png"),
    "evaluate --json": ("evaluate", "--json", "mine.json"),
    "evaluate real-train --json": ("evaluate real-train", "--json", "mine.json"),
    "forward --out": ("forward", "--out", "mine.png"),
}


@pytest.mark.parametrize("case", EXISTING_OUTPUTS)
def test_an_existing_file_is_never_replaced_by_an_output(model_dir, tmp_path, capsys, monkeypatch, no_work, case):
    command, option, name = EXISTING_OUTPUTS[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(b"the user's own file")
    argv = _read_and_write(model_dir, command, option, name)
    if command == "sample" and option == "--gif":
        argv += ["--out", "new.png"]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 2 and stderr.count("\n") == 1 and stdout == "", stderr
    assert stderr == (f"ddpm-fashion {command.split()[0]}: error: output {name} exists; give a new name or delete it "
                      "first (an existing file is never replaced)\n")
    assert (tmp_path / name).read_bytes() == b"the user's own file" and os.listdir(tmp_path) == [name]


LINKED_OUTPUTS = {
    "sample --out": ("sample", "--out", "link.png"),
    "compare --json": ("compare", "--json", "link.json"),
    "evaluate --json": ("evaluate", "--json", "link.json"),
    "evaluate --samples_file": ("evaluate", "--samples_file", "link.safetensors"),
    "forward --out": ("forward", "--out", "link.png"),
    "train-classifier --out": ("train-classifier", "--out", "link"),
}


@pytest.mark.parametrize("case", LINKED_OUTPUTS)
def test_an_output_that_is_a_dangling_link_is_refused_and_the_link_kept(model_dir, tmp_path, capsys, monkeypatch,
                                                                         no_work, case):
    command, option, name = LINKED_OUTPUTS[case]
    monkeypatch.chdir(tmp_path)
    os.symlink("elsewhere/missing", name)
    code, _, stderr = run_cli(_read_and_write(model_dir, command, option, name), capsys)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert f"{name} " in stderr and "elsewhere/missing, which does not exist" in stderr, stderr
    assert os.listdir(tmp_path) == [name] and os.readlink(name) == "elsewhere/missing"


NAMED_OUTPUTS = {
    "sample --out": ("sample", "--out", ".png"),
    "sample --gif": ("sample", "--gif", ".gif"),
    "compare --json": ("compare", "--json", ".json"),
    "evaluate --json": ("evaluate", "--json", ".json"),
    "evaluate --samples_file": ("evaluate", "--samples_file", ".safetensors"),
    "forward --out": ("forward", "--out", ".pdf"),
    "train-classifier --out": ("train-classifier", "--out", ""),
}


@pytest.mark.parametrize("too_long_for", ["the temporary name", "the file system"])
@pytest.mark.parametrize("case", NAMED_OUTPUTS)
def test_a_name_too_long_is_refused_before_any_work_saying_how_long_it_may_be(model_dir, tmp_path, capsys,
                                                                               monkeypatch, no_work, case,
                                                                               too_long_for):
    """A name that fits the file system but not the temporary name it is written under failed after the work."""
    command, option, suffix = NAMED_OUTPUTS[case]
    monkeypatch.chdir(tmp_path)
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    length = name_max - 2 if too_long_for == "the temporary name" else name_max + 45
    name = "n" * (length - len(suffix)) + suffix
    code, _, stderr = run_cli(_read_and_write(model_dir, command, option, name), capsys)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert re.search(rf": the name has {length} bytes; at most \d+ are allowed here \({name_max} minus \d+ for the "
                     r"temporary name it is written under\)$", stderr.strip()), stderr
    assert os.listdir(tmp_path) == []


FOLDER_IS_A_FILE = {
    "sample --out": ("sample", "--out", "a-file/s.png"),
    "sample --gif": ("sample", "--gif", "a-file/deeper/r.gif"),
    "compare --out": ("compare", "--out", "a-file/c.png"),
    "evaluate --json": ("evaluate", "--json", "a-file/r.json"),
    "forward --out": ("forward", "--out", "a-file/f.png"),
    "train-classifier --out": ("train-classifier", "--out", "a-file/classifier"),
}


@pytest.mark.parametrize("case", FOLDER_IS_A_FILE)
def test_an_output_whose_folder_is_a_file_names_that_file(model_dir, tmp_path, capsys, monkeypatch, no_work, case):
    command, option, target = FOLDER_IS_A_FILE[case]
    monkeypatch.chdir(tmp_path)
    Path("a-file").write_text("not a folder")
    code, _, stderr = run_cli(_read_and_write(model_dir, command, option, target), capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.strip().endswith(f"{target} cannot be {'created' if command == 'train-classifier' else 'written'}: "
                                   "a-file is not a directory"), stderr
    assert os.listdir(tmp_path) == ["a-file"] and Path("a-file").read_text() == "not a folder"


# ---- a full disk: refused up front where the size is known, one line naming the file where it is not ----------

@pytest.fixture
def full_disk(tmp_path):
    """A real 256 KB file system (tmpfs) filled to the last byte by a dummy file: every write into it fails."""
    with mounted_tmpfs(tmp_path / "full-disk", "256k") as mount:
        fill_disk(mount)
        assert shutil.disk_usage(mount).free == 0
        yield mount


def test_a_png_grid_its_disk_cannot_hold_is_refused_before_sampling(model_dir, full_disk, capsys, no_work):
    out = full_disk / "s.png"
    code, stdout, stderr = run_cli(["sample", "--model", model_dir, "--num_inference_steps", 2, "--num_images", 4,
                                    "--out", out], capsys)
    assert code == 2 and stderr.count("\n") == 1 and stdout == "", stderr
    bound = sample_command.png_grid_bytes(4, (1, SIZE, SIZE), 2)
    assert stderr == (f"ddpm-fashion sample: error: output {out} needs up to {bound / 1000:.1f} KB, but its disk has "
                      "0 bytes free; free space or give a path on another disk\n")
    assert os.listdir(full_disk) == ["filler"]


FULL_DISK_WRITES = {
    "sample --out (jpg)": lambda m, full, t: ["sample", "--model", m, "--num_inference_steps", 2, "--num_images", 2,
                                              "--out", full / "s.jpg"],
    "sample --gif": lambda m, full, t: ["sample", "--model", m, "--num_inference_steps", 2, "--num_images", 2,
                                        "--out", t / "s.png", "--gif", full / "r.gif"],
    "compare --json": lambda m, full, t: ["compare", "--model", m, "--num_inference_steps", 2, "--num_images", 2,
                                          "--json", full / "r.json"],
    "compare --out": lambda m, full, t: ["compare", "--model", m, "--num_inference_steps", 2, "--num_images", 2,
                                         "--out", full / "c.png"],
    "forward --out": lambda m, full, t: ["forward", "--data_dir", write_synthetic_fashion_mnist(t, 20, 20), "--dpi",
                                         20, "--out", full / "f.png"],
}


@pytest.mark.parametrize("case", FULL_DISK_WRITES)
def test_a_write_that_finds_the_disk_full_is_one_line_naming_the_file_and_leaves_nothing(model_dir, full_disk,
                                                                                          tmp_path, capsys, case):
    argv = FULL_DISK_WRITES[case](model_dir, full_disk, tmp_path)
    target = argv[-1]
    code, _, stderr = run_cli(argv, capsys)
    error = stderr.strip().splitlines()[-1]  # after the progress bars
    assert code == 2 and "Traceback" not in stderr, stderr
    assert error == (f"ddpm-fashion {argv[0]}: error: cannot write output {target}: no space left on its disk; free "
                     "space or give a path on another disk"), stderr
    assert os.listdir(full_disk) == ["filler"]  # no temporary file left behind


def test_train_classifier_on_a_full_disk_names_the_folder_and_leaves_nothing(full_disk, tmp_path, capsys):
    from ddpm_fashion.evaluation import classifier_training

    data_dir = write_synthetic_fashion_mnist(tmp_path, num_train=classifier_training.BATCH_SIZE, num_test=10)
    out = full_disk / "classifier"
    code, _, stderr = run_cli(["train-classifier", "--out", out, "--epochs", 1, "--data_dir", data_dir, "--quiet"],
                              capsys)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr == (f"ddpm-fashion train-classifier: error: cannot write --out {out}: no space left on its disk; "
                      "free space or give a path on another disk; nothing was saved\n")
    assert os.listdir(full_disk) == ["filler"]
