"""The sample-quality benchmark scripts (benchmarks/fid_scale.py, dark_pixels.py, ddim_steps.py) on the real data and a
tiny random pipeline."""

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler as LibraryDDPMScheduler

from conftest import load_benchmark
from ddpm_fashion.evaluation.reference_cache import CACHE_ENV
from ddpm_fashion.sampling.generate import predicted_original

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
