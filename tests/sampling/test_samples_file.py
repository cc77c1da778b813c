"""The resumable samples file of `ddpm-fashion evaluate --samples_file` (ddpm_fashion/sampling/samples_file.py): a run
continues where it stopped with identical results; a file of other settings or tensors is refused and left alone; its
size is checked up front, and a save that still finds the disk full keeps the batches saved before."""

import json
import os
import shutil

import pytest
import torch

from conftest import fill_disk, mounted_tmpfs, run_cli
from ddpm_fashion.evaluation import sample_quality
from ddpm_fashion.evaluation.reference_cache import CACHE_ENV
from ddpm_fashion.sampling import samples_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- saved samples: a long sampling run continues where it stopped ---------------------------------------------

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
    code, _, err = run_cli(common + ["--num_samples", 30, "--samples_file", samples, "--json",
                                     tmp_path / "resumed.json"], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == ("ddpm-fashion evaluate: interrupted; rerun the same "
                                                            "command to continue from --samples_file")
    monkeypatch.setattr(samples_file, "save_samples", save_samples)
    assert len(load_file(samples)["images"]) == 10 and not (tmp_path / "resumed.json").exists()

    code, _, err = run_cli(common + ["--num_samples", 30, "--samples_file", samples, "--json",
                                     tmp_path / "resumed.json"], capsys)
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
    code, _, err = run_cli(common + ["--num_samples", 20, "--samples_file", samples, "--json",
                                     tmp_path / "prefix.json"], capsys)
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


# ---- a samples file whose tensors are not what this model makes is refused and left alone ----------------------

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
