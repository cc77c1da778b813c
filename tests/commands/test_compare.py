"""`ddpm-fashion compare` (ddpm_fashion/commands/compare.py) on a tiny random pipeline: our U-Net and scheduler against
the library's, the exit code and report when a combination differs, and refusals that write nothing."""

import json
import os
import re

import pytest
import torch
from PIL import Image

from conftest import SIZE, copy_model, run_cli
from ddpm_fashion.models.unet import UNet
from ddpm_fashion.sampling import own_vs_library, saved_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_compare_reports_identical_images_for_all_four_combinations(model_dir, tmp_path, capsys, monkeypatch):
    own_unets = []

    def load_and_keep_own_unet(*args, **kwargs):
        pipe = saved_pipeline.load_pipeline(*args, **kwargs)
        if isinstance(pipe.unet, UNet):
            own_unets.append(pipe.unet)
        return pipe

    monkeypatch.setattr(own_vs_library, "load_pipeline", load_and_keep_own_unet)
    report_path, out = tmp_path / "report.json", tmp_path / "own_vs_library.png"
    code, stdout, stderr = run_cli(["compare", "--model", model_dir, "--num_inference_steps", 3, "--num_images", 2,
                                    "--seed", 3, "--json", report_path, "--out", out], capsys)
    report = json.loads(report_path.read_text())
    runs = {(run["unet"], run["scheduler"], run["mode"]): run for run in report["runs"]}
    assert list(runs) == [("diffusers", "diffusers", "reference"), ("diffusers", "own", "reference"),
                          ("own", "diffusers", "reference"), ("own", "own", "reference"), ("own", "own", "fast")]
    # Our scheduler is bit-exact, and so is our U-Net in reference mode.
    for combination in [("diffusers", "diffusers"), ("diffusers", "own"), ("own", "diffusers"), ("own", "own")]:
        assert runs[(*combination, "reference")]["max_abs_diff"] == 0.0
        assert runs[(*combination, "reference")]["tolerance"] == 1e-5  # the equality gate
    assert runs["own", "own", "fast"]["tolerance"] == own_vs_library.LAYOUT_TOLERANCE
    for run in report["runs"]:
        assert run["max_abs_diff"] <= own_vs_library.MAX_ABS_DIFF_TOLERANCE, run  # a tiny model stays under 1e-5 anyway
        assert run["sec_per_step"] > 0 and run["images_per_s"] > 0
        assert run["unet_forward_ms"] > 0 and run["scheduler_step_ms"] > 0
    assert report["settings"]["num_inference_steps"] == 3 and report["settings"]["num_images"] == 2
    assert report["settings"]["seed"] == 3 and report["settings"]["dtype"] == "float32"
    assert [unet.reference_mode for unet in own_unets] == [True, True, False]
    assert code == 0, stderr
    assert "max |Δ|" in stdout and "own (fast)" in stdout and stdout.count("\n") >= 6
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > 5 * (2 * (SIZE + 2) + 2)


def test_compare_exits_1_when_a_combination_differs(model_dir, tmp_path, capsys, monkeypatch):
    def load_with_perturbed_own_unet(*args, **kwargs):
        pipe = saved_pipeline.load_pipeline(*args, **kwargs)
        if isinstance(pipe.unet, UNet):
            with torch.no_grad():
                pipe.unet.conv_out.bias.add_(0.1)
        return pipe

    monkeypatch.setattr(own_vs_library, "load_pipeline", load_with_perturbed_own_unet)
    report_path = tmp_path / "report.json"
    code, _, stderr = run_cli(["compare", "--model", model_dir, "--num_inference_steps", 2, "--num_images", 2,
                               "--json", report_path], capsys)
    assert code == 1
    assert re.search(r"FAILED: unet=own scheduler=diffusers \([0-9.e-]+ > 1e-05\), unet=own scheduler=own \([0-9.e-]+ "
                     r"> 1e-05\), unet=own \(fast\) scheduler=own \([0-9.e-]+ > 0.001\) differ", stderr), stderr
    runs = json.loads(report_path.read_text())["runs"]  # the report is still written, to show the difference
    assert [run["max_abs_diff"] > own_vs_library.LAYOUT_TOLERANCE for run in runs] == [False, False, True, True, True]


def test_bad_compare_steps_write_nothing(model_dir, tmp_path, capsys):
    code, _, stderr = run_cli(["compare", "--model", model_dir, "--num_inference_steps", 0,
                               "--json", tmp_path / "r.json", "--out", tmp_path / "c.png"], capsys)
    assert code == 2 and stderr.startswith("ddpm-fashion compare: error: num_inference_steps must be between")
    assert os.listdir(tmp_path) == []


def test_compare_with_non_finite_samples_writes_no_report(model_dir, tmp_path, capsys):
    model = copy_model(model_dir, tmp_path)
    config_file = model / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "beta_start": 2.0, "beta_end": 2.0}))
    code, _, stderr = run_cli(["compare", "--model", model, "--num_inference_steps", 2, "--num_images", 2,
                               "--json", tmp_path / "r.json"], capsys)
    assert code == 2 and "NaN or infinite" in stderr and "differ from the library" not in stderr, stderr
    assert not (tmp_path / "r.json").exists()
