"""`ddpm-fashion sample` (ddpm_fashion/commands/sample.py) on a tiny random pipeline: the grid and GIF it writes, every
scheduler, the bound on a PNG grid's size, and one-line refusals of bad input."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import SIZE, copy_model, run_cli
from ddpm_fashion.commands import sample as sample_command

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_sample_writes_a_grid_and_a_reverse_process_gif(model_dir, tmp_path, capsys):
    out, gif = tmp_path / "samples.png", tmp_path / "reverse.gif"
    code, stdout, _ = run_cli(["sample", "--model", model_dir, "--num_inference_steps", 4, "--num_images", 4,
                               "--batch_size", 3, "--out", out, "--gif", gif], capsys)
    assert code == 0
    assert f"wrote 4 images (own scheduler, 4 steps) to {out}" in stdout
    with Image.open(out) as grid:
        assert grid.format == "PNG"
        assert grid.size == (2 * (SIZE + 2) + 2,) * 2  # 2 x 2 images with 2-pixel borders
    with Image.open(gif) as animation:
        assert animation.format == "GIF"
        assert animation.n_frames == 5  # the 4 steps, then the finished samples
        first = animation.convert("L").copy()
        animation.seek(animation.n_frames - 1)
        assert first.tobytes() != animation.convert("L").tobytes()
    assert sorted(os.listdir(tmp_path)) == ["reverse.gif", "samples.png"]  # no temporary files left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not the staging file's private one


@pytest.mark.parametrize("scheduler", ["ddim", "ddim-to-t0", "dpm", "diffusers"])
def test_sample_with_other_schedulers(model_dir, tmp_path, capsys, scheduler):
    out = tmp_path / "samples.png"
    code, stdout, _ = run_cli(["sample", "--model", model_dir, "--scheduler", scheduler, "--num_inference_steps", 3,
                               "--num_images", 2, "--out", out], capsys)
    assert code == 0 and f"({scheduler} scheduler, 3 steps)" in stdout
    with Image.open(out) as grid:
        assert grid.size == (2 * (SIZE + 2) + 2, SIZE + 4)


def test_the_png_grid_bound_holds_for_incompressible_images_at_every_compression_level():
    import io

    from ddpm_fashion.sampling.pictures import image_grid

    for num_images in (1, 2, 5, 64, 257):
        images = torch.rand(num_images, 1, 32, 32)
        bound = sample_command.png_grid_bytes(num_images, (1, 32, 32), 2)
        for level in (0, 6, 9):  # 0 stores the pixels: the largest file PIL writes
            written = io.BytesIO()
            image_grid(images).save(written, format="PNG", compress_level=level)
            assert written.tell() <= bound, (num_images, level)
            if level == 0 and num_images >= 64:  # stored pixels: the bound is tight, not a guess
                assert written.tell() > 0.95 * bound
    assert sample_command.grid_file_bytes(Path("s.jpg"), 4, (1, 32, 32)) is None  # no bound for lossy formats


# ---- bad input -------------------------------------------------------------------------------------------------

def _not_a_ddpm_pipeline(model_dir, tmp_path):
    folder = tmp_path / "ddim-pipeline"
    shutil.copytree(model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "DDIMPipeline"}))
    return folder


def _corrupt_weights(model_dir, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(model_dir, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    return folder


BAD_SAMPLE_INPUTS = {
    "missing model dir": (lambda m, t: ["--model", t / "nowhere"], "model directory .* does not exist"),
    "empty model dir": (lambda m, t: ["--model", t], "is not a saved DDPMPipeline: it has no model_index.json"),
    "other pipeline": (lambda m, t: ["--model", _not_a_ddpm_pipeline(m, t)], "holds a DDIMPipeline, not a DDPM"),
    "corrupt weights": (lambda m, t: ["--model", _corrupt_weights(m, t)], "is not a loadable DDPMPipeline"),
    "corrupt weights, own unet": (lambda m, t: ["--model", _corrupt_weights(m, t), "--unet", "own"],
                                  "is not a loadable DDPMPipeline"),
    "unknown scheduler": (lambda m, t: ["--model", m, "--scheduler", "euler"], "invalid choice: 'euler'"),
    "zero steps": (lambda m, t: ["--model", m, "--num_inference_steps", 0], "between 1 and the 1000 training"),
    "negative steps": (lambda m, t: ["--model", m, "--num_inference_steps", -5], "between 1 and the 1000 training"),
    "too many steps": (lambda m, t: ["--model", m, "--num_inference_steps", 1001], "between 1 and the 1000 training"),
    "zero images": (lambda m, t: ["--model", m, "--num_images", 0], "must be a positive integer, got 0"),
    "missing out dir": (lambda m, t: ["--model", m, "--out", t / "no" / "s.png"], "directory .* does not exist"),
    "out is a dir": (lambda m, t: ["--model", m, "--out", t / "dir.png"], "is a directory"),
    "unknown suffix": (lambda m, t: ["--model", m, "--out", t / "s.txt"], "must end in one of: .png"),
    "gif suffix": (lambda m, t: ["--model", m, "--gif", t / "r.png"], r"must end in one of: \.gif"),
}


@pytest.mark.parametrize("case", BAD_SAMPLE_INPUTS)
def test_bad_sample_input_is_one_line_exit_2_and_writes_nothing(model_dir, tmp_path, capsys, case):
    make_args, message = BAD_SAMPLE_INPUTS[case]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "dir.png").mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = make_args(model_dir, scratch)
    if "--out" not in args:
        args += ["--out", out_dir / "samples.png"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # A case's own --num_inference_steps comes later and wins: argparse keeps the last value.
    code, stdout, stderr = run_cli(["sample", "--num_inference_steps", 2, *args], capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("ddpm-fashion sample: error: "), stderr
    assert "Traceback" not in stderr
    assert re.search(message, stderr), stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so --device cuda is valid here")
def test_cuda_without_a_gpu_is_refused(model_dir, tmp_path, capsys):
    code, _, stderr = run_cli(["sample", "--model", model_dir, "--device", "cuda", "--out", tmp_path / "s.png"],
                              capsys)
    assert code == 2 and "no CUDA GPU is available" in stderr and stderr.count("\n") == 1


@pytest.mark.parametrize("scheduler", ["own", "diffusers", "ddim"])
def test_non_finite_samples_from_finite_weights_are_refused(model_dir, tmp_path, capsys, scheduler):
    model = copy_model(model_dir, tmp_path)
    config_file = model / "scheduler" / "scheduler_config.json"
    # beta > 1 makes alpha = 1 - beta negative, and sqrt(alpha-bar) NaN: a broken config, not broken weights.
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "beta_start": 2.0, "beta_end": 2.0}))
    code, _, stderr = run_cli(["sample", "--model", model, "--scheduler", scheduler, "--num_inference_steps", 2,
                               "--num_images", 2, "--out", tmp_path / "s.png"], capsys)
    error = stderr.strip().splitlines()[-1]  # after the progress bar of the steps that ran
    assert code == 2 and "Traceback" not in stderr and error.startswith("ddpm-fashion sample: error: "), stderr
    assert "NaN or infinite values in batch 0" in error and "scheduler config" in error, stderr
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no black picture
