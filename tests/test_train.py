"""train_accelerate.py end to end: the published pipeline, exact resume, multi-process equivalence, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train_accelerate.py"
SMOKE = ROOT / "configs" / "smoke.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}

sys.path.insert(0, str(ROOT))
import train_accelerate  # noqa: E402


def run_training(output_dir, data_dir, *extra, launcher=(sys.executable,)):
    """Run the trainer on the smoke config in a subprocess; fail the test with its output if it fails."""
    command = [*launcher, str(SCRIPT), "--config", str(SMOKE), "--output_dir", str(output_dir),
               "--data_dir", str(data_dir), *map(str, extra)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def train_in_process(output_dir, data_dir, *extra):
    """Run the trainer's main() in this process (saves the interpreter start-up of a subprocess)."""
    args = ["--config", str(SMOKE), "--output_dir", str(output_dir), "--data_dir", str(data_dir), *map(str, extra)]
    code = train_accelerate.main(args)
    assert code == 0, f"train_accelerate.main({args}) returned {code}"


def trainer_state(output_dir, step):
    """The trainer state saved with checkpoint-<step>."""
    return json.loads((Path(output_dir) / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())


def checkpoint_tensors(output_dir, step):
    """Model and EMA weights of checkpoint-<step>."""
    folder = Path(output_dir) / "checkpoints" / f"checkpoint-{step}"
    return load_file(folder / "model.safetensors"), load_file(folder / "ema.safetensors")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, train_data_dir):
    """One smoke training run shared by the tests that only read its outputs."""
    output_dir = tmp_path_factory.mktemp("smoke") / "out"
    result = run_training(output_dir, train_data_dir, "--checkpointing_steps", 4)
    return output_dir, result


def test_smoke_run_publishes_a_plain_diffusers_pipeline(smoke_run):
    output_dir, result = smoke_run
    index = json.loads((output_dir / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for name in ("README.md", "samples.png", "loss.png", "train_config.yaml"):
        assert (output_dir / name).is_file(), name
    assert "library_name: diffusers" in (output_dir / "README.md").read_text()
    assert "done: 12 steps" in result.stdout + result.stderr
    # a fresh process that never imports ddpm_fashion loads and runs it
    code = ("import sys, torch; from diffusers import DDPMPipeline; "
            f"pipe = DDPMPipeline.from_pretrained({str(output_dir)!r}); "
            "out = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type='np'); "
            "assert 'ddpm_fashion' not in sys.modules; "
            "assert pipe.scheduler.config.num_train_timesteps == 1000; print(out.images.shape)")
    loaded = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "(2, 32, 32, 1)" in loaded.stdout


def test_checkpoints_total_limit_keeps_the_newest(smoke_run):
    output_dir, _ = smoke_run
    names = sorted(p.name for p in (output_dir / "checkpoints").iterdir())
    assert names == ["checkpoint-12", "checkpoint-8"]  # steps 4, 8, 12 saved; limit 2 in smoke.yaml
    saved = (output_dir / "checkpoints" / "checkpoint-12" / "train_config.yaml").read_text()
    assert saved == (output_dir / "train_config.yaml").read_text()


def test_resume_is_bitwise_exact(tmp_path, train_data_dir):
    common = ["--lr_scheduler", "constant_with_warmup", "--checkpointing_steps", 4, "--save_images_steps", 100]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_in_process(straight, train_data_dir, *common, "--max_train_steps", 8)
    train_in_process(stopped, train_data_dir, *common, "--max_train_steps", 4)
    # a half-written checkpoint from a process killed mid-save must be ignored by `latest`
    (stopped / "checkpoints" / ".tmp-checkpoint-6").mkdir()
    train_in_process(stopped, train_data_dir, *common, "--max_train_steps", 8, "--resume_from_checkpoint", "latest")
    model_a, ema_a = checkpoint_tensors(straight, 8)
    model_b, ema_b = checkpoint_tensors(stopped, 8)
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key
    assert trainer_state(straight, 8)["losses"] == trainer_state(stopped, 8)["losses"]
    assert not (stopped / "checkpoints" / ".tmp-checkpoint-6").exists()


def test_own_and_diffusers_unet_train_identically(tmp_path, train_data_dir):
    runs = {}
    for impl in ("own", "diffusers"):
        train_in_process(tmp_path / impl, train_data_dir, "--unet_impl", impl, "--max_train_steps", 4,
                     "--checkpointing_steps", 4, "--save_images_steps", 100)
        runs[impl] = trainer_state(tmp_path / impl, 4)["losses"]
    assert len(runs["own"]) == 4
    assert runs["own"] == pytest.approx(runs["diffusers"], rel=1e-4)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, train_data_dir):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun is not installed beside this Python")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    common = ["--max_train_steps", 4, "--checkpointing_steps", 4, "--save_images_steps", 100]
    train_in_process(tmp_path / "one", train_data_dir, *common, "--train_batch_size", 16)
    run_training(tmp_path / "two", train_data_dir, *common, "--train_batch_size", 8,
                 launcher=(torchrun, "--nproc_per_node", "2", "--master_port", "29517"))
    assert trainer_state(tmp_path / "two", 4)["losses"] == pytest.approx(
        trainer_state(tmp_path / "one", 4)["losses"], rel=1e-5)
    model_one, _ = checkpoint_tensors(tmp_path / "one", 4)
    model_two, _ = checkpoint_tensors(tmp_path / "two", 4)
    for key in model_one:
        # Adam divides by sqrt(v): a float-rounding difference in a near-zero gradient moves a weight by a
        # fraction of lr, so compare against the size of an update (lr 1e-3), not the weight.
        torch.testing.assert_close(model_two[key], model_one[key], rtol=1e-4, atol=1e-5)


def test_dry_run_prints_the_resolved_config(capsys):
    assert train_accelerate.main(["--config", str(SMOKE), "--learning_rate", "3e-4", "--unet.layers_per_block",
                                  "2", "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "learning_rate: 0.0003" in printed
    assert "layers_per_block: 2" in printed


def test_default_config_is_the_gpu_config(capsys):
    assert train_accelerate.main(["--dry_run"]) == 0
    assert "block_out_channels:\n  - 64\n  - 128" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--learning_rate", "-1"], "learning_rate must be positive"),
    (["--train_batch_size", "0"], "train_batch_size must be at least 1"),
    (["--learning_rate", "fast"], "invalid float value"),
    (["--no_such_key", "1"], "unknown argument"),
    (["--unet.down_block_types", "[CrossAttnDownBlock2D, DownBlock2D]"], "CrossAttnDownBlock2D"),
    (["--unet.sample_size", "31"], "sample_size"),
    (["--unet.sample_size", "64"], "sample_size"),
    (["--mixed_precision", "fp16"], "fp16"),
    (["--data_dir", "/nonexistent/fashion"], "/nonexistent/fashion"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "not a checkpoint folder"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, train_data_dir, capsys, extra, message):
    if extra[0] == "--mixed_precision" and torch.cuda.is_available():
        pytest.skip("fp16 is valid on this machine: it has a GPU")
    output_dir = tmp_path / "out"
    data = [] if "--data_dir" in extra else ["--data_dir", train_data_dir]
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(output_dir), *data, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not output_dir.exists()


def test_output_dir_that_is_not_ours_is_refused(tmp_path, train_data_dir, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(tmp_path), "--data_dir",
                                  train_data_dir])
    assert code == 2
    assert "not a ddpm_fashion run" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_unwritable_output_dir_is_refused(capsys, train_data_dir):
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", "/sys/ddpm-out", "--data_dir",
                                  train_data_dir])
    assert code == 2
    assert "not writable" in capsys.readouterr().err


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, train_data_dir, capsys):
    output_dir = tmp_path / "out"
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(output_dir), "--data_dir",
                                  str(train_data_dir), "--learning_rate", "1e30", "--lr_warmup_steps", "0",
                                  "--max_grad_norm", "1e30", "--checkpointing_steps", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "loss became" in err and "at step" in err
    assert any((output_dir / "checkpoints").glob("checkpoint-*"))
    assert not (output_dir / "model_index.json").exists()


def test_bf16_mixed_precision_on_cpu_with_tensorboard_logging(tmp_path, train_data_dir):
    output_dir = tmp_path / "out"
    # A subprocess: Accelerate's process-wide state keeps the precision of the first Accelerator made in a process.
    run_training(output_dir, train_data_dir, "--mixed_precision", "bf16", "--logger", "tensorboard",
                 "--max_train_steps", 4, "--checkpointing_steps", 4, "--save_images_steps", 2)
    losses = trainer_state(output_dir, 4)["losses"]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    events = list((output_dir / "logs").rglob("events.out.tfevents.*"))
    assert events and all(event.stat().st_size > 0 for event in events)
    published = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in published.values()} == {torch.float32}  # autocast, not bf16 weights


def test_a_run_killed_at_any_moment_resumes(tmp_path, train_data_dir):
    """SIGKILL the trainer as soon as its first checkpoint exists (maybe mid-save of the next), then resume."""
    import signal
    import time

    output_dir = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--config", str(SMOKE), "--output_dir", str(output_dir),
               "--data_dir", str(train_data_dir), "--max_train_steps", "20", "--checkpointing_steps", "2",
               "--save_images_steps", "100"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (output_dir / "checkpoints" / "checkpoint-2").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output_dir / "model_index.json").exists()  # killed before publishing
    train_in_process(output_dir, train_data_dir, "--max_train_steps", 20, "--checkpointing_steps", 2,
                     "--save_images_steps", 100, "--resume_from_checkpoint", "latest")
    assert trainer_state(output_dir, 20)["global_step"] == 20
    assert (output_dir / "model_index.json").is_file()
