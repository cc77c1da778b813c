"""Sample-quality metrics: they must rank degraded images worse, agree with their libraries, and report a protocol."""

import json
import math
import os
import shutil
from fractions import Fraction

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from diffusers import DDPMScheduler as LibraryDDPMScheduler
from torchvision.transforms.functional import gaussian_blur

from conftest import fill_disk, mounted_tmpfs, load_benchmark
from ddpm_fashion.evaluation import sample_quality
from ddpm_fashion.evaluation import features
from ddpm_fashion.evaluation import metrics
from ddpm_fashion.sampling import pictures
from ddpm_fashion.sampling import samples_file
from ddpm_fashion.cli import main
from ddpm_fashion.data import CLASS_NAMES, load_fashion_mnist
from ddpm_fashion.evaluation.precision_recall import precision_recall
from ddpm_fashion.evaluation.reference_cache import CACHE_ENV, reference_features
from ddpm_fashion.sampling.generate import predicted_original

NUM_IMAGES = 1000  # enough for stable FID ranks of a 128-d feature, few enough to stay fast
JSON_KEYS = {"fid", "features", "num_samples", "reference", "sampler", "num_inference_steps", "precision", "recall",
             "class_histogram", "class_kl_from_uniform", "seed", "image_size", "crop", "feature_extractor"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    """One cache folder for the whole module, so the test set's features are computed once."""
    return tmp_path_factory.mktemp("reference-cache")


@pytest.fixture(scope="module")
def built_evaluators():
    """Evaluators built so far in this module: building one extracts the features of the whole test set."""
    return {}


@pytest.fixture
def evaluator(real_data_dir, reference_cache, built_evaluators):
    """An fmnist Evaluator against the real test set, built once per module."""
    if real_data_dir not in built_evaluators:
        built_evaluators[real_data_dir] = sample_quality.Evaluator(data_dir=real_data_dir, cache=reference_cache)
    return built_evaluators[real_data_dir]


@pytest.fixture
def real_images(real_data_dir):
    """NUM_IMAGES real training images as floats [N, 1, 28, 28] in [0, 1], as a generator would return them."""
    return sample_quality.real_training_images(NUM_IMAGES, seed=1, data_dir=real_data_dir).float() / 255


def test_real_training_images_score_close_to_the_test_set_and_noise_far_from_it(evaluator, real_images):
    real = evaluator.evaluate(real_images)
    noise = evaluator.evaluate(torch.rand(NUM_IMAGES, 1, 28, 28))
    assert 0 <= real["fid"] < 2.0
    assert noise["fid"] > 50 * real["fid"]
    assert real["precision"] > 0.7 and real["recall"] > 0.7
    # Noise images all land on one spot of feature space; k-NN precision counts it as "real" if that spot falls in
    # the ball of an outlying real image (the weakness Naeem et al. 2020 address), so precision stays above 0.
    assert noise["precision"] < 0.3 and noise["recall"] < 0.05
    assert real["class_kl_from_uniform"] < 0.01  # the classes of real images are balanced
    assert noise["class_kl_from_uniform"] > 0.5  # noise is not a garment, whatever class it is forced into


def _fid_ladder(evaluator, images, degrade, strengths):
    """FID of images degraded at each strength."""
    return [evaluator.evaluate(degrade(images, strength))["fid"] for strength in strengths]


def test_fid_rises_monotonically_with_gaussian_noise(evaluator, real_images):
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(real_images.shape, generator=generator)
    fids = _fid_ladder(evaluator, real_images, lambda x, sigma: (x + sigma * noise).clamp(0, 1),
                       (0.0, 0.05, 0.1, 0.2, 0.4))
    assert all(lower < higher for lower, higher in zip(fids, fids[1:])), fids


def test_fid_rises_monotonically_with_blur(evaluator, real_images):
    fids = _fid_ladder(evaluator, real_images,
                       lambda x, sigma: gaussian_blur(x, kernel_size=9, sigma=sigma) if sigma else x,
                       (0.0, 0.6, 1.0, 1.5, 2.5))
    assert all(lower < higher for lower, higher in zip(fids, fids[1:])), fids


def test_generated_32px_images_are_cropped_to_the_data_before_scoring(evaluator, real_images):
    padded = torch.nn.functional.pad(real_images, (2, 2, 2, 2))  # [N, 1, 32, 32], as the model generates them
    assert evaluator.evaluate(padded)["fid"] == pytest.approx(evaluator.evaluate(real_images)["fid"], rel=1e-6)


def test_frechet_distance_is_torchmetrics_fid_on_the_extractor(evaluator, real_images):
    from torchmetrics.image.fid import FrechetInceptionDistance

    images = pictures.to_uint8_images(real_images[:300])
    library = FrechetInceptionDistance(feature=evaluator.extractor)  # torchmetrics runs the extractor itself
    library.update(pictures.to_uint8_images(real_images[300:700]), real=True)
    library.update(images, real=False)
    ours = metrics.frechet_distance(features.extract_features(evaluator.extractor, images),
                                     features.extract_features(evaluator.extractor,
                                                               pictures.to_uint8_images(real_images[300:700])))
    assert ours == pytest.approx(library.compute().item(), rel=1e-5)


def test_precision_recall_follows_the_k_nearest_neighbour_definition():
    # Reference points on a line at 0..9: with k=3 an inner point's ball has radius 2, an end point's radius 3.
    reference = torch.arange(10.0)[:, None]
    inside = torch.tensor([[2.5], [7.0], [-3.0], [11.0]])
    half_outside = torch.tensor([[2.5], [30.0], [7.0], [-20.0]])
    assert precision_recall(inside, reference)["precision"] == 1.0
    assert precision_recall(half_outside, reference)["precision"] == 0.5
    # Recall: reference points inside balls around the generated points (radius: the 3rd neighbour among them).
    assert precision_recall(torch.arange(0.0, 10.0, 2.0)[:, None], reference)["recall"] == 1.0
    clustered = torch.tensor([[0.0], [0.1], [0.2], [0.3], [0.4]])  # radii 0.2 to 0.3: only point 0 is covered
    assert precision_recall(clustered, reference)["recall"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(inside[:3], reference)


def test_class_histogram_and_its_kl_from_uniform():
    balanced = metrics.class_histogram(torch.arange(100) % 10)
    assert balanced.tolist() == [0.1] * 10
    assert metrics.kl_from_uniform(balanced) == pytest.approx(0.0, abs=1e-12)
    single = metrics.class_histogram(torch.full((7,), 3))
    assert metrics.kl_from_uniform(single) == pytest.approx(math.log(10))
    halves = metrics.class_histogram(torch.tensor([6, 8]))  # half "Shirt", half "Bag"
    assert metrics.kl_from_uniform(halves) == pytest.approx(math.log(5))


def test_reference_features_are_cached_by_extractor_split_and_data(evaluator, real_data_dir, reference_cache):
    files = sorted(reference_cache.glob("reference-*.safetensors"))
    assert [path.name.split("-")[1] for path in files] == ["fmnist"]
    assert f"-{evaluator.reference_split}-" in files[0].name
    cached = reference_features(evaluator.extractor, "test", real_data_dir, cache=reference_cache)
    assert torch.equal(cached, evaluator.reference)
    assert evaluator.reference.shape == (len(load_fashion_mnist("test", real_data_dir)[0]), evaluator.extractor.num_features)
    # A damaged cache file is recomputed and replaced, never trusted.
    files[0].write_bytes(b"not safetensors")
    recomputed = reference_features(evaluator.extractor, "test", real_data_dir, cache=reference_cache)
    torch.testing.assert_close(recomputed, evaluator.reference, rtol=1e-5, atol=1e-5)
    assert not any(path.name.startswith(".") for path in reference_cache.iterdir())


@pytest.mark.parametrize("bad, message", [
    (torch.rand(20, 3, 28, 28), "grey"),
    (torch.rand(20, 1, 30, 30), "grey"),
    (torch.rand(20, 1, 28, 28) * 2, r"\[0, 1\]"),
    (torch.rand(5, 1, 28, 28), "at least"),
])
def test_bad_images_are_refused(evaluator, bad, message):
    with pytest.raises(ValueError, match=message):
        evaluator.evaluate(bad)


def run_cli(argv, capsys):
    """Run the CLI in-process; get (exit code, stdout, stderr)."""
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_real_train_writes_the_report_and_protocol(real_data_dir, reference_cache, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(reference_cache))
    report_path = tmp_path / "report.json"
    code, out, err = run_cli(["evaluate", "--model", "real-train", "--num_samples", 500, "--json", report_path,
                              "--data_dir", real_data_dir, "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert JSON_KEYS <= set(report)
    assert report["num_samples"] == 500 and report["features"] == "fmnist" and report["reference"] == "test"
    assert report["model"] == "real-train" and report["sampler"] is None and report["num_inference_steps"] is None
    assert list(report["class_histogram"]) == list(CLASS_NAMES)
    assert sum(report["class_histogram"].values()) == pytest.approx(1.0)
    assert 0 <= report["fid"] < 5 and 0 < report["precision"] <= 1 and 0 < report["recall"] <= 1
    assert f"FID {report['fid']:.3f}" in out and "protocol:" in out


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A saved DDPMPipeline with a tiny random 32x32 U-Net: its images are noise, but they go the generated path."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    DDPMPipeline(unet=unet, scheduler=LibraryDDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def test_evaluate_generated_images_reports_sampler_and_speed(tiny_pipeline, real_data_dir, reference_cache, tmp_path,
                                                             capsys, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(reference_cache))
    report_path = tmp_path / "report.json"
    code, out, err = run_cli(["evaluate", "--model", tiny_pipeline, "--num_samples", 20, "--scheduler", "ddim",
                              "--num_inference_steps", 2, "--batch_size", 10, "--json", report_path,
                              "--data_dir", real_data_dir, "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert JSON_KEYS <= set(report)
    assert report["sampler"] == "ddim" and report["num_inference_steps"] == 2 and report["num_samples"] == 20
    assert report["final_timestep"] == 40  # `ddim` ends its walk there (ddpm_fashion/schedulers/ddim.py)
    assert report["seconds_per_1000_images"] > 0 and "CPU" in report["machine"]
    assert report["fid"] > 10  # an untrained U-Net makes no garments
    assert "s per 1000 images" in out


@pytest.mark.parametrize("argv, message", [
    (["--features", "inception", "--inception_weights", "/nonexistent/inception.pth"], "--inception_weights"),
    (["--features", "inception"], "--inception_weights"),
    (["--inception_weights", "x.pth"], "only applies to --features inception"),
    (["--num_samples", "3"], "at least"),
    (["--json", "/nonexistent/report.json"], "does not exist"),
])
def test_evaluate_refuses_bad_input_in_one_line(argv, message, real_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached Inception weights to fall back to
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    code, out, err = run_cli(["evaluate", "--model", "real-train", "--num_samples", 20, "--data_dir", real_data_dir,
                              "--device", "cpu", *argv], capsys)
    assert code == 2
    assert err.startswith("ddpm-fashion evaluate: error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_inception_weights_that_are_not_a_plain_state_dict_are_refused_unread(tmp_path):
    pickled = tmp_path / "weights.pth"
    torch.save({"conv": torch.zeros(1), "payload": Fraction(1, 3)}, pickled)  # only full unpickling can read it
    with pytest.raises(ValueError, match="tensors-only state dict"):
        features.InceptionFeatures(str(pickled))
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"conv": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="does not hold FID InceptionV3 weights"):
        features.InceptionFeatures(str(wrong))


def test_inception_features_equal_torchmetrics_standard_extractor(tmp_path, monkeypatch):
    """With any weights (random here: the real ones need the internet), our path computes torchmetrics' features."""
    from safetensors.torch import save_file
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity
    from torchmetrics.image.fid import NoTrainInceptionV3

    torch.manual_seed(0)
    with monkeypatch.context() as patch:  # build torchmetrics' extractor with random weights, no weights file
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        library = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])  # FID's default settings
    weights = tmp_path / "inception.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in library.state_dict().items()}, weights)

    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    ours = features.InceptionFeatures(str(weights))
    assert ours.num_features == 2048 and "antialias=True" in ours.description
    torch.testing.assert_close(ours(images), library(images.repeat(1, 3, 1, 1)), rtol=0, atol=0)


# ---- saved samples: a long sampling run continues where it stopped ---------------------------------------------

def test_generate_images_resumed_after_any_whole_batch_equals_the_uninterrupted_run(tiny_pipeline):
    from ddpm_fashion.sampling.generate import generate_images
    from ddpm_fashion.sampling.saved_pipeline import load_pipeline

    pipe = load_pipeline(tiny_pipeline, scheduler="own", device="cpu")
    uninterrupted = generate_images(pipe, 10, batch_size=4, num_inference_steps=3, seed=3, progress=False)
    snapshots = []
    generate_images(pipe, 10, batch_size=4, num_inference_steps=3, seed=3, progress=False,
                    on_batch=lambda images, generator: snapshots.append((images.clone(), generator.get_state())))
    assert [len(images) for images, _ in snapshots] == [4, 8, 10]
    assert torch.equal(snapshots[-1][0], uninterrupted)
    for snapshot in snapshots[:2]:
        resumed = generate_images(pipe, 10, batch_size=4, num_inference_steps=3, seed=3, progress=False,
                                  resume=snapshot)
        assert torch.equal(resumed, uninterrupted)
    with pytest.raises(ValueError, match="whole batches"):  # 10 images are not whole batches of 4
        generate_images(pipe, 12, batch_size=4, num_inference_steps=3, seed=3, progress=False, resume=snapshots[-1])


def test_evaluate_samples_file_continues_an_interrupted_run_with_identical_results(
        tiny_pipeline, real_data_dir, reference_cache, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from ddpm_fashion.sampling import generate

    monkeypatch.setenv(CACHE_ENV, str(reference_cache))
    common = ["evaluate", "--model", tiny_pipeline, "--num_inference_steps", 2, "--batch_size", 10,
              "--data_dir", real_data_dir, "--device", "cpu"]
    samples = tmp_path / "samples.safetensors"
    save_samples = samples_file.save_samples

    def save_then_stop(*args, **kwargs):
        save_samples(*args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C right after the first batch was saved

    monkeypatch.setattr(samples_file, "save_samples", save_then_stop)
    code, _, err = run_cli(common + ["--num_samples", 30, "--samples_file", samples, "--json", tmp_path / "resumed.json"],
                           capsys)
    assert code == 130 and err.strip().splitlines()[-1] == ("ddpm-fashion evaluate: interrupted; rerun the same "
                                                            "command to continue from --samples_file")
    monkeypatch.setattr(samples_file, "save_samples", save_samples)
    assert len(load_file(samples)["images"]) == 10 and not (tmp_path / "resumed.json").exists()

    code, _, err = run_cli(common + ["--num_samples", 30, "--samples_file", samples, "--json", tmp_path / "resumed.json"],
                           capsys)
    assert code == 0, err
    assert "continuing from 10 images" in err
    code, _, err = run_cli(common + ["--num_samples", 30, "--json", tmp_path / "whole.json"], capsys)
    assert code == 0, err
    resumed, whole = (json.loads((tmp_path / name).read_text()) for name in ("resumed.json", "whole.json"))
    for key in ("fid", "precision", "recall", "class_histogram", "num_samples"):
        assert resumed[key] == whole[key], key
    assert len(load_file(samples)["images"]) == 30
    assert resumed["sampling_seconds"] > 0 and resumed["seconds_per_1000_images"] > 0

    # A finished file serves a shorter run of whole batches without sampling anything.
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled although the samples file holds the images")

    code, _, err = run_cli(common + ["--num_samples", 20, "--json", tmp_path / "twenty.json"], capsys)
    assert code == 0, err
    monkeypatch.setattr(generate, "generate_images", no_sampling)
    code, _, err = run_cli(common + ["--num_samples", 20, "--samples_file", samples, "--json", tmp_path / "prefix.json"],
                           capsys)
    assert code == 0, err
    prefix, twenty = (json.loads((tmp_path / name).read_text()) for name in ("prefix.json", "twenty.json"))
    assert prefix["fid"] == twenty["fid"] and prefix["num_samples"] == 20


@pytest.mark.parametrize("change, message", [
    (["--seed", 1], "made with seed 0, this run has 1"),
    (["--num_inference_steps", 3], "made with num_inference_steps 2, this run has 3"),
    (["--num_samples", 15], "multiple of --batch_size 10"),
    (["--model", "real-train"], "generates none"),
    (["--samples_file", "samples.npz"], "must end in one of: .safetensors"),
])
def test_evaluate_refuses_a_samples_file_of_other_settings_and_leaves_it_alone(
        change, message, tiny_pipeline, real_data_dir, reference_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(reference_cache))
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", "--model", tiny_pipeline, "--num_inference_steps", 2, "--batch_size", 10, "--num_samples", 20,
            "--samples_file", "samples.safetensors", "--data_dir", real_data_dir, "--device", "cpu"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    before = (tmp_path / "samples.safetensors").read_bytes()
    changed = list(argv)
    flag, value = change
    if flag in changed:
        changed[changed.index(flag) + 1] = value
    else:
        changed += [flag, value]
    code, _, err = run_cli(changed + ["--json", "report.json"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("ddpm-fashion evaluate: error:")
    assert (tmp_path / "samples.safetensors").read_bytes() == before and not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("earlier_ddim, shown", [({}, "final_timestep None"),  # walked down to t = 0
                                                 ({"final_timestep": 20}, "final_timestep 20")])  # ended at 20
def test_a_samples_file_of_an_earlier_ddim_is_refused_not_continued(
        earlier_ddim, shown, tiny_pipeline, real_data_dir, reference_cache, tmp_path, capsys, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import save_file

    monkeypatch.setenv(CACHE_ENV, str(reference_cache))
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", "--model", tiny_pipeline, "--num_inference_steps", 2, "--batch_size", 10, "--num_samples", 20,
            "--samples_file", "samples.safetensors", "--data_dir", real_data_dir, "--device", "cpu"]
    code, _, err = run_cli([*argv, "--scheduler", "ddim-to-t0"], capsys)
    assert code == 0, err
    # the file an earlier `--scheduler ddim` wrote (down to t = 0, or ended at t = 20), named "ddim"
    with safe_open("samples.safetensors", framework="pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    settings = json.loads(metadata["settings"])
    assert settings["sampler"] == "ddim-to-t0" and "final_timestep" not in settings
    metadata["settings"] = json.dumps({**settings, "sampler": "ddim", **earlier_ddim}, sort_keys=True)
    save_file(tensors, "samples.safetensors", metadata=metadata)
    before = (tmp_path / "samples.safetensors").read_bytes()
    code, _, err = run_cli([*argv, "--scheduler", "ddim", "--json", "report.json"], capsys)
    assert code == 2 and shown in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "samples.safetensors").read_bytes() == before and not (tmp_path / "report.json").exists()


def test_evaluate_refuses_a_file_that_is_not_its_samples_and_never_overwrites_it(
        tiny_pipeline, real_data_dir, reference_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(reference_cache))
    precious = tmp_path / "weights.safetensors"
    precious.write_bytes(b"the user's own file")
    code, _, err = run_cli(["evaluate", "--model", tiny_pipeline, "--num_inference_steps", 2, "--num_samples", 10,
                            "--samples_file", precious, "--data_dir", real_data_dir, "--device", "cpu"], capsys)
    assert code == 2 and "is not a samples file" in err and len(err.strip().splitlines()) == 1, err
    assert precious.read_bytes() == b"the user's own file"


def test_fid_scale_benchmark_orders_each_degradation_ladder(tmp_path, real_data_dir, reference_cache, monkeypatch,
                                                            capsys):
    import sys

    monkeypatch.setenv(CACHE_ENV, str(reference_cache))
    benchmark = load_benchmark("fid_scale")
    monkeypatch.setattr(sys, "argv", ["fid_scale.py", "--num_samples", "500", "--data_dir", real_data_dir,
                                      "--json", str(tmp_path / "scale.json")])
    benchmark.main()
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert len(rows) == 1 + len(benchmark.NOISE_SIGMAS) + len(benchmark.BLUR_SIGMAS)
    assert rows[0]["times_floor"] == 1.0 and rows[0]["fid"] < 0.5
    for prefix in ("+ pixel noise", "blur"):
        fids = [rows[0]["fid"]] + [row["fid"] for row in rows if row["images"].startswith(prefix)]
        assert all(lower < higher for lower, higher in zip(fids, fids[1:])), (prefix, fids)
    assert "x floor" in capsys.readouterr().out


def test_dark_pixels_benchmark_finds_a_grey_background_and_what_snapping_it_recovers(
        tiny_pipeline, tmp_path, real_data_dir, reference_cache, monkeypatch, capsys):
    from safetensors.torch import save_file

    from ddpm_fashion.evaluation.sample_quality import real_training_images

    monkeypatch.setenv(CACHE_ENV, str(reference_cache))
    benchmark = load_benchmark("dark_pixels")
    # the floor's own images with every black pixel made 3/255: a grey background and nothing else wrong
    real = real_training_images(300, 0, real_data_dir)
    grey = real.masked_fill(real == 0, 3)
    save_file({"images": grey.float() / 255}, tmp_path / "grey.safetensors")
    benchmark.main(["--images", str(tmp_path / "grey.safetensors"), "--model", str(tiny_pipeline), "--num_samples",
                    "300", "--data_dir", real_data_dir, "--json", str(tmp_path / "dark.json")])
    study = json.loads((tmp_path / "dark.json").read_text())
    rows = {(row["images"], row["snapped_at_or_below"]): row for row in study["rows"]}
    assert rows["generated", 0]["black_share"] == 0.0
    assert rows["generated", 0]["near_black_share"] > rows["real training images", 0]["near_black_share"] + 0.3
    assert rows["generated", 0]["fid"] > 2 * rows["real training images", 0]["fid"]
    # snapped at 4/255 the grey images are exactly the real ones snapped at 4/255
    assert rows["generated", 4]["fid"] == pytest.approx(rows["real training images", 4]["fid"], rel=1e-5)
    assert 0.45 < study["reference_shares"]["black_share"] < 0.55  # half of a test image is black
    errors = study["low_noise_errors"]
    assert [row["timestep"] for row in errors] == list(benchmark.LOW_TIMESTEPS)
    assert all(0 < row["noise_level"] < row_next["noise_level"] for row, row_next in zip(errors, errors[1:]))
    assert "t =    0: noise level 0.0100" in capsys.readouterr().out


# ---- issue 12: a samples file whose tensors are not what this model makes is refused and left alone -------------

def _rewrite_samples(path, **tensors):
    """Replace some tensors of a samples file, keeping its metadata (settings, format) as they are."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        saved = {name: handle.get_tensor(name) for name in handle.keys()}
    save_file({**saved, **tensors}, path, metadata=metadata)


@pytest.mark.parametrize("tensors, message", [
    ({"generator_state": torch.zeros(100, dtype=torch.uint8)},
     "its generator_state is torch.uint8 [100], a CPU generator's state is torch.uint8 [5056]"),
    ({"generator_state": torch.zeros(5056, dtype=torch.int64)}, "its generator_state is torch.int64 [5056]"),
    ({"images": torch.rand(10, 3, 32, 32)}, "its images have shape [10, 3, 32, 32], this model makes [N, 1, 32, 32]"),
    ({"images": torch.rand(10, 1, 28, 28)}, "its images have shape [10, 1, 28, 28]"),
    ({"images": torch.rand(10, 1, 32, 32, dtype=torch.float64)}, "its images are torch.float64"),
    ({"images": torch.full((10, 1, 32, 32), float("nan"))}, "outside [0, 1] or NaN"),
])
def test_evaluate_refuses_a_samples_file_with_wrong_tensors_and_leaves_it_untouched(
        tensors, message, tiny_pipeline, real_data_dir, reference_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(reference_cache))
    samples = tmp_path / "samples.safetensors"
    argv = ["evaluate", "--model", tiny_pipeline, "--num_inference_steps", 2, "--batch_size", 10, "--num_samples", 20,
            "--samples_file", samples, "--data_dir", real_data_dir, "--device", "cpu"]
    save_samples = samples_file.save_samples

    def save_then_stop(*args, **kwargs):
        save_samples(*args, **kwargs)
        raise KeyboardInterrupt  # one batch of 10 saved: a run to continue

    monkeypatch.setattr(samples_file, "save_samples", save_then_stop)
    assert run_cli(argv, capsys)[0] == 130
    monkeypatch.setattr(samples_file, "save_samples", save_samples)
    _rewrite_samples(samples, **tensors)
    before = samples.read_bytes()
    code, _, err = run_cli(argv + ["--json", tmp_path / "report.json"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "is not a samples file" in err and message in err, err
    assert samples.read_bytes() == before and not (tmp_path / "report.json").exists()


def test_a_reference_cache_inside_the_shipped_weights_is_not_written(evaluator, real_data_dir, capsys):
    from ddpm_fashion.evaluation.classifier import WEIGHTS_DIR

    before = sorted(path.name for path in WEIGHTS_DIR.iterdir())
    features = reference_features(evaluator.extractor, "test", real_data_dir, cache=WEIGHTS_DIR)
    torch.testing.assert_close(features, evaluator.reference, rtol=1e-5, atol=1e-5)
    assert sorted(path.name for path in WEIGHTS_DIR.iterdir()) == before
    assert "not caching reference features" in capsys.readouterr().err


def test_ddim_steps_final_x0_from_ends_the_walk_with_that_steps_x0_estimate():
    from diffusers import DDIMScheduler

    ddim_steps = load_benchmark("ddim_steps")
    config = LibraryDDPMScheduler(num_train_timesteps=1000).config
    diagnostics = {"shift_sum": 0.0, "clipped_sum": 0.0, "image_steps": 0}
    ended = ddim_steps.make_scheduler(config, ddim_steps.parse_setting("clip_sample=false,final_x0_from=200"), 0,
                                      diagnostics)
    plain = DDIMScheduler.from_config(config, clip_sample=False)
    ended.set_timesteps(4)
    plain.set_timesteps(4)
    assert ended.timesteps.tolist() == [750, 500, 250] and plain.timesteps.tolist() == [750, 500, 250, 0]
    described = ddim_steps.describe_timesteps(ddim_steps.make_scheduler(
        config, ddim_steps.parse_setting("clip_sample=false,final_x0_from=200"), 0, dict(diagnostics)), 4)
    assert (described["last_timestep"], described["model_calls"]) == (250, 3)
    generator = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(2, 1, 8, 8, generator=generator), torch.randn(2, 1, 8, 8, generator=generator)
    # above the end: the plain DDIM step; at the end: x_0_hat itself, not a step to t = 0
    torch.testing.assert_close(ended.step(model_output, 500, sample).prev_sample,
                               plain.step(model_output, 500, sample).prev_sample, rtol=0, atol=0)
    final = ended.step(model_output, 250, sample)
    torch.testing.assert_close(final.prev_sample, predicted_original(plain, model_output, 250, sample))
    assert not torch.allclose(final.prev_sample, plain.step(model_output, 250, sample).prev_sample)


def test_ddim_steps_benchmark_writes_a_row_per_setting_and_step_count(tiny_pipeline, real_data_dir, reference_cache,
                                                                       tmp_path, capsys):
    ddim_steps = load_benchmark("ddim_steps")
    report = tmp_path / "ddim.json"
    argv = ["--model", str(tiny_pipeline), "--settings", "inherited", "noclip", "--steps", "2", "4", "--num_samples",
            "12", "--batch_size", "12", "--data_dir", real_data_dir, "--json", str(report)]
    rows = ddim_steps.main(argv)
    assert [(row["setting"], row["steps"]) for row in rows] == [
        ("inherited", 2), ("inherited", 4), ("noclip", 2), ("noclip", 4)]
    assert all(math.isfinite(row["fid"]) and row["fid"] > 0 for row in rows)
    assert all(0 <= row["black_share"] <= 1 and 0 <= row["near_black_share"] <= 1 for row in rows)
    # the two settings really sample differently (clipping x_0 or not), from the same noise
    assert rows[1]["fid"] != rows[3]["fid"]
    assert [row["fid"] for row in json.loads(report.read_text())["rows"]] == [row["fid"] for row in rows]
    # a second run continues the file and samples nothing again
    assert ddim_steps.main(argv) == rows
    assert "(from" in capsys.readouterr().out
    # a run under another protocol refuses the file instead of replacing its rows
    before = report.read_bytes()
    with pytest.raises(SystemExit) as refused:
        ddim_steps.main([*argv[:-2], "--num_samples", "10", "--json", str(report)])
    assert refused.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "num_samples: 12 -> 10" in message, message
    assert report.read_bytes() == before


# ---- a full disk: the samples file's size is known, so it is checked before sampling; a save that still finds the
# disk full is one line naming the file, which keeps the batches saved before ------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 512 KB file system (tmpfs), empty; fill_disk(small_disk) leaves it no byte free."""
    with mounted_tmpfs(tmp_path / "small-disk", "512k") as mount:
        yield mount


def test_a_samples_file_its_disk_cannot_hold_is_refused_before_sampling(tiny_pipeline, small_disk, real_data_dir,
                                                                        capsys, monkeypatch):
    def no_work(*args, **kwargs):
        pytest.fail("the command started working before it checked the space of its samples file")

    monkeypatch.setattr(sample_quality, "Evaluator", no_work)
    monkeypatch.setattr(samples_file, "save_samples", no_work)
    # 20 images in batches of 10: the last save writes the 20-image file beside the 10-image one. Each file holds
    # its float32 images, the generator's state, and a header of at most 64 KiB.
    file_bytes = {n: n * 32 * 32 * 4 + torch.Generator().get_state().numel() + 64 * 1024 for n in (10, 20)}
    needed = file_bytes[20] + file_bytes[10]
    with open(small_disk / "filler", "wb") as handle:
        handle.write(b"\0" * (shutil.disk_usage(small_disk).free - needed + 4096))
    free = shutil.disk_usage(small_disk).free
    assert free < needed < free + 8192  # a disk that holds the final file, but not the file beside the one before
    samples = small_disk / "samples.safetensors"
    code, _, err = run_cli(["evaluate", "--model", tiny_pipeline, "--num_inference_steps", 2, "--batch_size", 10,
                            "--num_samples", 20, "--samples_file", samples, "--data_dir", real_data_dir,
                            "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err == (f"ddpm-fashion evaluate: error: output {samples} needs up to {needed / 1000:.1f} KB, but its disk "
                   f"has {free / 1000:.1f} KB free; free space or give a path on another disk\n")
    assert os.listdir(small_disk) == ["filler"]


def test_a_samples_file_save_that_finds_the_disk_full_names_the_file_and_a_rerun_continues(
        tiny_pipeline, small_disk, real_data_dir, reference_cache, capsys, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv(CACHE_ENV, str(reference_cache))
    samples = small_disk / "samples.safetensors"
    argv = ["evaluate", "--model", tiny_pipeline, "--num_inference_steps", 2, "--batch_size", 10, "--num_samples", 20,
            "--samples_file", samples, "--data_dir", real_data_dir, "--device", "cpu"]
    save_samples, saves = samples_file.save_samples, []

    def fill_the_disk_then_save(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # something else fills the disk while the second batch is sampled
            fill_disk(small_disk)
        save_samples(*args, **kwargs)

    monkeypatch.setattr(samples_file, "save_samples", fill_the_disk_then_save)
    code, _, err = run_cli(argv, capsys)
    error = err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2 and "Traceback" not in err, err
    assert error == (f"ddpm-fashion evaluate: error: cannot write --samples_file {samples}: no space left on its disk; "
                     "free space or give a path on another disk; it keeps the images saved before, so rerun the "
                     "same command to continue"), err
    assert sorted(os.listdir(small_disk)) == ["filler", "samples.safetensors"]  # no temporary file left behind
    assert len(load_file(samples)["images"]) == 10

    monkeypatch.setattr(samples_file, "save_samples", save_samples)
    (small_disk / "filler").unlink()
    code, _, err = run_cli(argv, capsys)
    assert code == 0 and "continuing from 10 images" in err, err
    assert len(load_file(samples)["images"]) == 20
