"""The `ddpm-fashion` CLI and the sampling, comparison and figure code behind it, on a tiny random pipeline."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel
from diffusers import DDPMScheduler as LibraryDDPMScheduler
from PIL import Image

from conftest import fill_disk, mounted_tmpfs, write_synthetic_fashion_mnist
from ddpm_fashion.sampling import own_vs_library
from ddpm_fashion.sampling import reverse_process_gif
from ddpm_fashion.sampling import generate
from ddpm_fashion.sampling import saved_pipeline
from ddpm_fashion.cli import main
from ddpm_fashion.commands import sample as sample_command
from ddpm_fashion.schedulers.forward_figures import SCHEDULES, noised_images, one_per_class, schedule_curves
from ddpm_fashion.schedulers.ddpm import DDPMScheduler
from ddpm_fashion.models.unet import UNet

SIZE = 16  # tiny images keep every U-Net forward in the millisecond range
REPO_ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved DDPMPipeline with a small random UNet2DModel (one attention level) and the 1000-step schedule."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    DDPMPipeline(unet=unet, scheduler=LibraryDDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return str(folder)


def run_cli(argv, capsys):
    """Run the CLI in-process; get (exit code, stdout, stderr)."""
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- sampling library ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["diffusers", "own"])
def test_generate_images_equals_ddpm_pipeline_call(model_dir, scheduler):
    pipe = saved_pipeline.load_pipeline(model_dir, scheduler=scheduler, unet="diffusers", device="cpu")
    ours = generate.generate_images(pipe, 3, batch_size=3, num_inference_steps=4, seed=7, progress=False)

    library = DDPMPipeline.from_pretrained(model_dir, local_files_only=True)
    library.set_progress_bar_config(disable=True)
    expected = library(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=4,
                       output_type="pt").images
    assert ours.shape == (3, 1, SIZE, SIZE) and ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert torch.equal(ours, expected)


def test_generate_images_in_batches_is_seeded_and_bounded_to_unit_range(model_dir):
    pipe = saved_pipeline.load_pipeline(model_dir, device="cpu")
    five = generate.generate_images(pipe, 5, batch_size=2, num_inference_steps=3, seed=1, progress=False)
    again = generate.generate_images(pipe, 5, batch_size=2, num_inference_steps=3, seed=1, progress=False)
    first_batch = generate.generate_images(pipe, 2, batch_size=2, num_inference_steps=3, seed=1, progress=False)
    other_seed = generate.generate_images(pipe, 2, batch_size=2, num_inference_steps=3, seed=2, progress=False)
    assert five.shape == (5, 1, SIZE, SIZE)
    assert five.min() >= 0 and five.max() <= 1
    assert torch.equal(five, again)
    assert torch.equal(five[:2], first_batch)  # one generator runs through the batches in order
    assert not torch.equal(five[2:4], five[:2])  # later batches continue the stream instead of restarting it
    assert (first_batch - other_seed).abs().max() > 0.01


@pytest.mark.parametrize("scheduler, walk", [("ddim", 9), ("ddim-to-t0", 10), ("dpm", 10)])
def test_the_progress_bar_counts_the_unet_calls_of_the_walk(model_dir, scheduler, walk, capsys):
    """`ddim` ends at t = 40, so 10 leading steps (900, ..., 100, 0) make 9 U-Net calls, and the bar ends full."""
    pipe = saved_pipeline.load_pipeline(model_dir, scheduler=scheduler, device="cpu")
    calls = []
    unet_forward = pipe.unet.forward
    pipe.unet.forward = lambda *args, **kwargs: calls.append(1) or unet_forward(*args, **kwargs)
    generate.generate_images(pipe, 3, batch_size=2, num_inference_steps=10, seed=0, progress=True)
    assert len(calls) == 2 * walk
    assert f"{2 * walk}/{2 * walk}" in capsys.readouterr().err


def test_load_pipeline_builds_the_requested_scheduler_and_unet(model_dir):
    own = saved_pipeline.load_pipeline(model_dir, scheduler="own", unet="own", device="cpu")
    assert isinstance(own.scheduler, DDPMScheduler) and isinstance(own.unet, UNet)
    ddim = saved_pipeline.load_pipeline(model_dir, scheduler="ddim", device="cpu")
    assert isinstance(ddim.scheduler, DDIMScheduler) and isinstance(ddim.unet, UNet2DModel)
    assert own.scheduler.config.clip_sample and not ddim.scheduler.config.clip_sample  # DDIM does not clip x_0
    inherited = saved_pipeline.load_pipeline(model_dir, scheduler="ddim-from-config", device="cpu").scheduler
    assert isinstance(inherited, DDIMScheduler) and inherited.config.clip_sample  # the user's choice: as from_config
    assert dict(inherited.config) == dict(DDIMScheduler.from_config(own.scheduler.config).config)
    dpm = saved_pipeline.load_pipeline(model_dir, scheduler="dpm", device="cpu")
    assert isinstance(dpm.scheduler, DPMSolverMultistepScheduler)
    assert dpm.scheduler.config.algorithm_type == "dpmsolver++"
    # Every scheduler keeps the trained noise schedule.
    for pipe in (own, ddim, dpm):
        assert torch.equal(pipe.scheduler.alphas_cumprod, LibraryDDPMScheduler().alphas_cumprod)
    torch.testing.assert_close(own.unet.state_dict(), ddim.unet.state_dict(), rtol=0, atol=0)


def test_generate_images_checks_inputs_before_running_the_unet(model_dir, monkeypatch):
    pipe = saved_pipeline.load_pipeline(model_dir, device="cpu")
    monkeypatch.setattr(pipe.unet, "forward", lambda *args, **kwargs: pytest.fail("the U-Net ran on bad input"))
    for steps in (0, -1, 1001):
        with pytest.raises(ValueError, match="num_inference_steps must be between 1 and the 1000"):
            generate.generate_images(pipe, 2, num_inference_steps=steps, progress=False)
    with pytest.raises(ValueError, match="num_images must be a positive integer"):
        generate.generate_images(pipe, 0, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        generate.generate_images(pipe, 2, batch_size=0, num_inference_steps=2, progress=False)


def test_resolve_device():
    assert saved_pipeline.resolve_device("cpu") == torch.device("cpu")
    assert saved_pipeline.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device 'tpu' is not supported; choose one of: auto, cpu, cuda"):
        saved_pipeline.resolve_device("tpu")


def test_predicted_original_matches_the_library_step():
    scheduler = LibraryDDPMScheduler(clip_sample=False)  # step() clips its x_0 estimate; ours is unclipped
    sample, model_output = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for timestep in (999, 500, 1):
        expected = scheduler.step(model_output, timestep, sample).pred_original_sample
        got = generate.predicted_original(scheduler, model_output, torch.tensor(timestep), sample)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_gif_frame_steps_spread_over_the_run_and_keep_both_ends():
    steps = reverse_process_gif.gif_frame_steps(1000)
    assert len(steps) == reverse_process_gif.MAX_GIF_FRAMES and steps[0] == 0 and steps[-1] == 999
    assert reverse_process_gif.gif_frame_steps(5) == [0, 1, 2, 3, 4]
    assert reverse_process_gif.gif_frame_steps(1) == [0]


# ---- sample ----------------------------------------------------------------------------------------------------

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


# ---- compare ---------------------------------------------------------------------------------------------------

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
        assert runs[(*combination, "reference")]["tolerance"] == 1e-5  # the gate
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


def test_each_run_is_held_to_its_own_tolerance():
    def run(mode, max_abs_diff):
        tolerance = own_vs_library.LAYOUT_TOLERANCE if mode == "fast" else own_vs_library.MAX_ABS_DIFF_TOLERANCE
        return {"unet": "own", "scheduler": "own", "mode": mode, "max_abs_diff": max_abs_diff, "tolerance": tolerance}

    report = {"runs": [run("reference", 5e-5), run("fast", 5e-5), run("reference", 5e-6), run("fast", 2e-3),
                       run("reference", float("nan"))]}
    failed = own_vs_library.mismatched_runs(report)
    assert [(r["mode"], r["max_abs_diff"]) for r in failed[:2]] == [("reference", 5e-5), ("fast", 2e-3)]
    assert len(failed) == 3 and math.isnan(failed[2]["max_abs_diff"])


# ---- forward ---------------------------------------------------------------------------------------------------

def test_forward_figure_from_synthetic_idx_files(tmp_path, capsys):
    data_dir = write_synthetic_fashion_mnist(tmp_path, num_train=20, num_test=20)
    out = tmp_path / "figure" / "forward.png"
    out.parent.mkdir()
    code, stdout, _ = run_cli(["forward", "--data_dir", data_dir, "--out", out, "--dpi", 40], capsys)
    assert code == 0 and f"to {out}" in stdout
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.width > 200 and figure.height > 200
    assert os.listdir(out.parent) == ["forward.png"]


def test_forward_figure_on_real_fashion_mnist(real_data_dir, tmp_path, capsys):
    out = tmp_path / "forward.png"
    code, _, _ = run_cli(["forward", "--data_dir", real_data_dir, "--out", out, "--dpi", 40], capsys)
    assert code == 0
    with Image.open(out) as figure:
        assert figure.format == "PNG"


def test_noised_images_follow_q_xt_given_x0(real_data_dir):
    from ddpm_fashion.data import load_fashion_mnist

    images, labels = load_fashion_mnist("test", real_data_dir)
    chosen = one_per_class(labels)
    assert labels[chosen].tolist() == list(range(10))
    clean = images[chosen].float() / 255
    noisy = torch.from_numpy(noised_images(images[chosen], (0, 999), DDPMScheduler(), seed=0))
    assert noisy.shape == (10, 2, 28, 28)
    # t = 0 keeps the image (beta_1 = 1e-4); at t = 999 almost nothing of it is left (alpha-bar = 4e-5).
    assert (noisy[:, 0] - clean).abs().max() < 0.05
    correlation = torch.corrcoef(torch.stack([noisy[:, 1].flatten(), clean.flatten()]))[0, 1]
    assert abs(correlation) < 0.05


def test_schedule_curves_are_the_library_schedules():
    curves = schedule_curves(1000)
    assert list(curves) == ["linear", "cosine", "sigmoid"]
    for name, (alpha_bar, snr) in curves.items():
        expected = LibraryDDPMScheduler(beta_schedule=SCHEDULES[name]).alphas_cumprod.double().numpy()
        assert (alpha_bar == expected).all()
        assert (snr[1:] < snr[:-1]).all()  # signal-to-noise falls at every step
        assert abs(snr[500] - expected[500] / (1 - expected[500])) < 1e-12


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


def test_forward_without_data_is_refused(tmp_path, capsys):
    code, _, stderr = run_cli(["forward", "--out", tmp_path / "f.png", "--data_dir", tmp_path / "nowhere"], capsys)
    assert code == 2 and stderr.startswith("ddpm-fashion forward: error: data_dir") and stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so --device cuda is valid here")
def test_cuda_without_a_gpu_is_refused(model_dir, tmp_path, capsys):
    code, _, stderr = run_cli(["sample", "--model", model_dir, "--device", "cuda", "--out", tmp_path / "s.png"],
                              capsys)
    assert code == 2 and "no CUDA GPU is available" in stderr and stderr.count("\n") == 1


def test_bad_compare_steps_write_nothing(model_dir, tmp_path, capsys):
    code, _, stderr = run_cli(["compare", "--model", model_dir, "--num_inference_steps", 0,
                               "--json", tmp_path / "r.json", "--out", tmp_path / "c.png"], capsys)
    assert code == 2 and stderr.startswith("ddpm-fashion compare: error: num_inference_steps must be between")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_is_one_line_and_exit_130_with_nothing_half_written(model_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "generate_images", interrupted)
    code, _, stderr = run_cli(["sample", "--model", model_dir, "--num_inference_steps", 2, "--out",
                               tmp_path / "grid.png"], capsys)
    assert code == 130 and stderr.strip() == "ddpm-fashion sample: interrupted"
    assert os.listdir(tmp_path) == []


# ---- entry points ----------------------------------------------------------------------------------------------

def test_python_m_ddpm_fashion_runs_the_cli(model_dir, tmp_path):
    command = [sys.executable, "-m", "ddpm_fashion"]
    as_text = lambda *args: [str(arg) for arg in args]  # noqa: E731
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the user's environment; no network in tests
    done = subprocess.run(as_text(*command, "sample", "--model", model_dir, "--num_inference_steps", 2,
                                  "--num_images", 2, "--device", "cpu", "--out", tmp_path / "s.png"),
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "s.png") as grid:
        assert grid.format == "PNG"

    bad = subprocess.run(as_text(*command, "sample", "--model", tmp_path / "nowhere"), capture_output=True, text=True,
                         env=env, cwd=REPO_ROOT, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_usage_errors_are_one_line_and_exit_2(capsys):
    code, _, stderr = run_cli([], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "the following arguments are required" in stderr
    code, _, stderr = run_cli(["sample"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "--model" in stderr
    code, stdout, _ = run_cli(["--help"], capsys)
    assert code == 0 and "sample" in stdout and "compare" in stdout and "forward" in stdout


def readme_python_block(marker: str) -> str:
    """The first ```python block of README.md that contains `marker`."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S):
        if marker in block:
            return block
    raise AssertionError(f"README.md has no python block containing {marker!r}")


def test_readme_scheduler_swap_snippet_runs(model_dir, tmp_path, monkeypatch):
    snippet = readme_python_block("pipe.scheduler = ddpm_fashion.DDPMScheduler.from_config")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet.replace('"out"', repr(str(model_dir))), "README.md", "exec"), namespace)
    assert (tmp_path / "sample.png").is_file()
    import ddpm_fashion
    from diffusers import DPMSolverMultistepScheduler

    assert isinstance(namespace["pipe"].unet, ddpm_fashion.UNet)
    assert isinstance(namespace["pipe"].scheduler, DPMSolverMultistepScheduler)
    assert namespace["pipe"].scheduler.config.algorithm_type == "dpmsolver++"


def test_readme_unet_conversion_snippet_runs(model_dir, tmp_path, monkeypatch):
    snippet = readme_python_block("ddpm_fashion.UNet.from_pretrained")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet.replace('"out"', repr(str(model_dir))), "README.md", "exec"), namespace)
    from diffusers import UNet2DModel

    copy = UNet2DModel.from_pretrained(tmp_path / "unet-copy")
    original = UNet2DModel.from_pretrained(model_dir, subfolder="unet")
    for (name, a), b in zip(original.state_dict().items(), copy.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# ---- issue 12: nothing a user made is lost; one-line errors for bad models, seeds and sizes ---------------------

def _copy_model(model_dir, tmp_path, name="model"):
    """A private copy of the tiny pipeline, so a case that damages it cannot damage the others."""
    folder = tmp_path / name
    shutil.copytree(model_dir, folder)
    return folder


def _snapshot(folder):
    """Every file under a folder with its bytes."""
    return {path.relative_to(folder): path.read_bytes() for path in sorted(Path(folder).rglob("*")) if path.is_file()}


SHIPPED_WEIGHTS = REPO_ROOT / "ddpm_fashion" / "weights"
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
    model = _copy_model(model_dir, tmp_path)
    (model / "samples.png").write_bytes(b"the trainer's samples")
    (model / "loss.png").write_bytes(b"the trainer's loss curve")
    monkeypatch.chdir(tmp_path)  # default outputs (forward.png, samples.png) land here, not in the repository
    model_before, shipped_before = _snapshot(model), _snapshot(SHIPPED_WEIGHTS)
    argv = PROTECTED_OUTPUTS[case](model) + ["--num_inference_steps" if "forward" not in case else "--dpi", 20]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and "would overwrite" in stderr and "Traceback" not in stderr, stderr
    assert _snapshot(model) == model_before and _snapshot(SHIPPED_WEIGHTS) == shipped_before
    assert sorted(os.listdir(tmp_path)) == ["model"]  # nothing written anywhere


def test_a_new_picture_beside_the_model_is_fine(model_dir, tmp_path, capsys):
    model = _copy_model(model_dir, tmp_path)
    before = _snapshot(model)
    code, _, stderr = run_cli(["sample", "--model", model, "--num_inference_steps", 2, "--num_images", 2,
                               "--out", model / "my-samples.png"], capsys)
    assert code == 0, stderr
    assert set(_snapshot(model)) == set(before) | {Path("my-samples.png")}


BIG_SEED = "99999999999999999999"
SEED_COMMANDS = {
    "sample": lambda m, t: ["sample", "--model", m, "--out", t / "s.png"],
    "compare": lambda m, t: ["compare", "--model", m],
    "forward": lambda m, t: ["forward", "--out", t / "f.png"],
    "evaluate": lambda m, t: ["evaluate", "--model", m],
    "evaluate real-train": lambda m, t: ["evaluate", "--model", "real-train"],
    "train-classifier": lambda m, t: ["train-classifier", "--out", t / "classifier"],
}


@pytest.mark.parametrize("seed", [BIG_SEED, "-1", "4294967296"])
@pytest.mark.parametrize("command", SEED_COMMANDS)
def test_a_seed_out_of_range_is_one_line_naming_seed_and_its_range(model_dir, tmp_path, capsys, command, seed):
    code, _, stderr = run_cli([*SEED_COMMANDS[command](model_dir, tmp_path), "--seed", seed], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"argument --seed: must be an integer from 0 to 4294967295, got {seed}" in stderr
    assert os.listdir(tmp_path) == []


def test_library_functions_refuse_a_seed_torch_cannot_take(model_dir):
    pipe = saved_pipeline.load_pipeline(model_dir, device="cpu")
    with pytest.raises(ValueError, match="seed must be an integer from 0 to 4294967295"):
        generate.generate_images(pipe, 1, num_inference_steps=1, seed=int(BIG_SEED), progress=False)
    with pytest.raises(ValueError, match="seed must be an integer from 0 to 4294967295"):
        own_vs_library.run_comparison(model_dir, 1, 1, seed=-1, device="cpu", progress=False)


@pytest.mark.parametrize("name, content", [
    ("scheduler/scheduler_config.json", "[1]"),
    ("scheduler/scheduler_config.json", '"DDPMScheduler"'),
    ("unet/config.json", "[16, 32]"),
    ("unet/config.json", "null"),
    ("model_index.json", "[]"),
    ("unet/config.json", "{not json"),
])
@pytest.mark.parametrize("command", ["sample", "compare"])
def test_a_config_file_that_is_not_an_object_is_named_in_one_line(model_dir, tmp_path, capsys, name, content,
                                                                   command):
    import warnings

    model = _copy_model(model_dir, tmp_path)
    (model / name).write_text(content)
    argv = [command, "--model", model, "--num_inference_steps", 2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, stdout, stderr = run_cli(argv + (["--out", tmp_path / "s.png"] if command == "sample" else []), capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert str(model / name) in stderr and ("JSON object" in stderr or "not valid JSON" in stderr), stderr
    assert "huggingface" not in stderr.lower() and "connect" not in stderr
    assert not [warning for warning in caught if issubclass(warning.category, FutureWarning)]
    assert sorted(os.listdir(tmp_path)) == ["model"]


def _with_non_finite_weights(model_dir, tmp_path, value):
    from safetensors.torch import load_file, save_file

    model = _copy_model(model_dir, tmp_path)
    weights_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    name = sorted(weights)[0]
    weights[name].view(-1)[:3] = value
    save_file(weights, weights_file)
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("command, unet", [("sample", "diffusers"), ("sample", "own"), ("compare", None),
                                           ("evaluate", None)])
def test_non_finite_weights_are_refused_in_one_line_and_nothing_is_written(model_dir, tmp_path, capsys, value,
                                                                           command, unet):
    model = _with_non_finite_weights(model_dir, tmp_path, value)
    options = {"sample": ["--out", tmp_path / "s.png", "--unet", unet, "--num_images", 2],
               "compare": ["--json", tmp_path / "r.json", "--out", tmp_path / "c.png", "--num_images", 2],
               "evaluate": ["--json", tmp_path / "r.json", "--samples_file", tmp_path / "s.safetensors",
                            "--num_samples", 10]}[command]
    code, stdout, stderr = run_cli([command, "--model", model, "--num_inference_steps", 2, *options], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "the model's weights are not finite (3 of" in stderr
    assert "diffusion_pytorch_model.safetensors" in stderr and "differ from the library" not in stderr
    assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.parametrize("scheduler", ["own", "diffusers", "ddim"])
def test_non_finite_samples_from_finite_weights_are_refused(model_dir, tmp_path, capsys, scheduler):
    model = _copy_model(model_dir, tmp_path)
    config_file = model / "scheduler" / "scheduler_config.json"
    # beta > 1 makes alpha = 1 - beta negative, and sqrt(alpha-bar) NaN: a broken config, not broken weights.
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "beta_start": 2.0, "beta_end": 2.0}))
    code, _, stderr = run_cli(["sample", "--model", model, "--scheduler", scheduler, "--num_inference_steps", 2,
                               "--num_images", 2, "--out", tmp_path / "s.png"], capsys)
    error = stderr.strip().splitlines()[-1]  # after the progress bar of the steps that ran
    assert code == 2 and "Traceback" not in stderr and error.startswith("ddpm-fashion sample: error: "), stderr
    assert "NaN or infinite values in batch 0" in error and "scheduler config" in error, stderr
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no black picture


def test_compare_with_non_finite_samples_writes_no_report(model_dir, tmp_path, capsys):
    model = _copy_model(model_dir, tmp_path)
    config_file = model / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "beta_start": 2.0, "beta_end": 2.0}))
    code, _, stderr = run_cli(["compare", "--model", model, "--num_inference_steps", 2, "--num_images", 2,
                               "--json", tmp_path / "r.json"], capsys)
    assert code == 2 and "NaN or infinite" in stderr and "differ from the library" not in stderr, stderr
    assert not (tmp_path / "r.json").exists()


HUGE = 1_000_000_000
ABSURD_SIZES = {
    "sample batch": (lambda m: ["sample", "--model", m, "--num_images", HUGE, "--batch_size", HUGE],
                     r"a batch of 1000000000 images needs about [\d.]+ TB of memory, .* lower --batch_size$"),
    "sample images": (lambda m: ["sample", "--model", m, "--num_images", HUGE],
                      r"keeping 1000000000 images needs about [\d.]+ TB of memory, .* lower --num_images$"),
    "compare images": (lambda m: ["compare", "--model", m, "--num_images", HUGE],
                       r"a batch of 1000000000 images needs about .* lower --num_images$"),
    "evaluate batch": (lambda m: ["evaluate", "--model", m, "--num_samples", HUGE, "--batch_size", HUGE],
                       r"a batch of 1000000000 images needs about .* lower --batch_size$"),
    "evaluate samples": (lambda m: ["evaluate", "--model", m, "--num_samples", HUGE],
                         r"keeping 1000000000 images needs about .* lower --num_samples$"),
}


@pytest.mark.parametrize("case", ABSURD_SIZES)
def test_absurd_sizes_are_refused_up_front_naming_the_option(model_dir, tmp_path, capsys, monkeypatch, case):
    make_args, message = ABSURD_SIZES[case]
    monkeypatch.setattr(generate, "denoise", lambda *args, **kwargs: pytest.fail("sampled before checking sizes"))
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli([*make_args(model_dir), "--num_inference_steps", 2, "--device", "cpu"], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert re.search(message, stderr.strip()), stderr
    assert os.listdir(tmp_path) == []


def test_a_model_too_large_for_one_image_names_its_sample_size(model_dir, tmp_path, capsys):
    model = _copy_model(model_dir, tmp_path)
    config_file = model / "unet" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "sample_size": 100000}))
    for command in ("sample", "compare"):
        code, _, stderr = run_cli([command, "--model", model, "--num_inference_steps", 2, "--num_images", 1], capsys)
        assert code == 2 and stderr.count("\n") == 1, stderr
        assert "one image of this model (sample_size 100000 in unet/config.json) needs about" in stderr, stderr
    assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.parametrize("dpi", ["100000", "0", "19", "601"])
def test_forward_dpi_outside_its_range_is_refused(tmp_path, capsys, dpi):
    code, _, stderr = run_cli(["forward", "--out", tmp_path / "f.png", "--dpi", dpi], capsys)
    assert code == 2 and f"argument --dpi: must be an integer from 20 to 600, got {dpi}" in stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 4000000000000 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"),
    MemoryError(),
])
def test_running_out_of_memory_is_one_line_naming_the_option_to_lower(model_dir, tmp_path, capsys, monkeypatch, error):
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(generate, "generate_images", out_of_memory)
    code, _, stderr = run_cli(["sample", "--model", model_dir, "--num_inference_steps", 2,
                               "--out", tmp_path / "s.png"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("ddpm-fashion sample: error: out of memory") and stderr.strip().endswith(
        "lower --batch_size"), stderr
    if not isinstance(error, MemoryError):
        assert re.search(r"\([Tt]ried to allocate [0-9.]+ (bytes|GiB)\)", stderr), stderr
    assert os.listdir(tmp_path) == []


def test_other_runtime_errors_still_show_their_traceback(model_dir, tmp_path, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug, not a size")

    monkeypatch.setattr(generate, "generate_images", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["sample", "--model", str(model_dir), "--num_inference_steps", "2", "--out", str(tmp_path / "s.png")])


def test_unet_memory_estimate_grows_with_batch_size_image_size_and_training():
    from ddpm_fashion.training.resources import FLOAT_BYTES, estimate_unet_bytes

    config = {"sample_size": 32, "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 8,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "add_attention": False}
    one, eight = estimate_unet_bytes(config, 1), estimate_unet_bytes(config, 8)
    assert eight > one and (eight - one) == 7 * (estimate_unet_bytes(config, 2) - one)  # linear in the batch
    assert estimate_unet_bytes(config, 8, training=True) > 2 * eight
    assert estimate_unet_bytes({**config, "sample_size": 64}, 8) > 4 * (eight - one)
    # At least the attention scores of the 16x16 level: 64/8 heads x 256 x 256 tokens per image, and their softmax.
    assert (eight - one) / 7 >= FLOAT_BYTES * 2 * 8 * 256 * 256
    assert estimate_unet_bytes({**config, "sample_size": [32, 16]}, 1) < one
    with pytest.raises(ValueError, match="sample_size must be a positive integer or a pair"):
        estimate_unet_bytes({**config, "sample_size": None}, 1)


def test_check_memory_names_the_option_only_when_it_does_not_fit():
    from ddpm_fashion.training.resources import available_memory, check_memory

    free = available_memory(torch.device("cpu"))
    check_memory(1000, "cpu", "a little", "--batch_size")
    with pytest.raises(ValueError, match=r"^a lot needs about .* of memory, more than the .* free on cpu; lower --x$"):
        check_memory(2 * free, "cpu", "a lot", "--x")


def test_an_output_that_is_a_link_to_a_model_file_is_refused(model_dir, tmp_path, capsys):
    model = _copy_model(model_dir, tmp_path)
    link = tmp_path / "report.json"
    link.symlink_to(model / "model_index.json")
    before = _snapshot(model)
    code, _, stderr = run_cli(["compare", "--model", model, "--json", link, "--num_inference_steps", 2], capsys)
    assert code == 2 and "would overwrite" in stderr and stderr.count("\n") == 1, stderr
    assert _snapshot(model) == before and link.is_symlink()


# ---- every output: new, outside every model folder's own files, and one line naming it when it cannot be written --

@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts its work (generate, data, scoring, training) before refusing an output."""
    from ddpm_fashion import data
    from ddpm_fashion.evaluation import classifier_training
    from ddpm_fashion.evaluation import sample_quality

    def fail(*args, **kwargs):
        pytest.fail("the command started working before it refused its output")

    for module, name in [(generate, "denoise"), (own_vs_library, "denoise"), (sample_quality, "Evaluator"),
                         (sample_quality, "real_training_images"), (data, "load_fashion_mnist"),
                         (classifier_training, "train_classifier")]:
        monkeypatch.setattr(module, name, fail)


def _other_model_and_run(model_dir, tmp_path):
    """A second saved pipeline B (with the trainer's pictures), and a run folder R with logs and a checkpoint."""
    from ddpm_fashion.training import run_dir

    other = _copy_model(model_dir, tmp_path, "B")
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
    model = _copy_model(model_dir, tmp_path, "A")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    code, stdout, stderr = run_cli(_read_and_write(model, command, option, target), capsys)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr and stdout == "", stderr
    expected = ("lies inside the checkpoint" if "checkpoint-2" in target else "would overwrite")
    assert stderr.startswith(f"ddpm-fashion {command.split()[0]}: error: ") and expected in stderr, stderr
    assert f" {target} " in stderr and "give a path outside it" in stderr, stderr
    assert _snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["A", "B", "R"]


def test_a_new_report_beside_another_model_is_written_and_never_replaced(model_dir, tmp_path, capsys):
    other, _ = _other_model_and_run(model_dir, tmp_path)
    before = _snapshot(other)
    argv = ["compare", "--model", model_dir, "--num_inference_steps", 2, "--num_images", 2, "--json",
            other / "eval.json"]
    code, _, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    report = (other / "eval.json").read_bytes()
    assert json.loads(report)["settings"]["num_images"] == 2
    assert set(_snapshot(other)) == set(before) | {Path("eval.json")}
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
