"""train_accelerate.py end to end: the published pipeline, exact resume, multi-process equivalence, bad input."""

import json
import re
import shutil
import signal
import textwrap
import time
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import (ENV, ROOT, SCRIPT, SMOKE, checkpoint_tensors, error_line, run_training, train_in_process,
                      trainer_state, tree)

sys.path.insert(0, str(ROOT))
import train_accelerate  # noqa: E402

from ddpm_fashion.training import run_dir  # noqa: E402
from ddpm_fashion.guards.files import STAGING_PREFIX, staging_path  # noqa: E402


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
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    half_written = staging_path(stopped / "checkpoints" / "checkpoint-6", owner=killed.pid)
    half_written.mkdir()
    train_in_process(stopped, train_data_dir, *common, "--max_train_steps", 8, "--resume_from_checkpoint", "latest")
    model_a, ema_a = checkpoint_tensors(straight, 8)
    model_b, ema_b = checkpoint_tensors(stopped, 8)
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key
    assert trainer_state(straight, 8)["losses"] == trainer_state(stopped, 8)["losses"]
    assert not half_written.exists()
    # the training time adds up over both sessions, and the model card says so
    first, total = trainer_state(stopped, 4)["train_seconds"], trainer_state(stopped, 8)["train_seconds"]
    assert 0 < first < total
    assert "s over all sessions (" in (stopped / "README.md").read_text()


def test_model_card_training_time_over_sessions():
    from ddpm_fashion.training.model_card import describe_training_time

    assert describe_training_time(5615.4, 3535.2) == "5615 s over all sessions (3535 s in the last)"
    assert describe_training_time(120.2, 120.2) == "120 s"
    assert describe_training_time(None, 3535.2) == "3535 s in the last session (earlier sessions did not record theirs)"


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


def test_default_config_is_the_gpu_config_when_a_gpu_is_present(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_accelerate.main(["--dry_run"]) == 0
    captured = capsys.readouterr()
    assert "block_out_channels:\n  - 64\n  - 128" in captured.out
    assert captured.err == ""


def test_without_gpu_or_config_the_cpu_config_is_trained_and_said_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_accelerate.main(["--dry_run"]) == 0
    captured = capsys.readouterr()
    assert "output_dir: out-cpu" in captured.out  # configs/cpu.yaml
    assert captured.err.count("\n") == 1 and "no GPU found" in captured.err
    assert "--config configs/fashion_mnist.yaml" in captured.err
    # an explicit --config is obeyed without a word
    assert train_accelerate.main(["--config", str(ROOT / "configs" / "fashion_mnist.yaml"), "--dry_run"]) == 0
    captured = capsys.readouterr()
    assert "output_dir: out\n" in captured.out and captured.err == ""


@pytest.mark.parametrize("extra, message", [
    (["--learning_rate", "-1"], "learning_rate must be positive"),
    (["--snr_weight_floor", "0.1"], "snr_weight_floor must be positive, with snr_gamma set, or null; got 0.1"),
    (["--snr_gamma", "5", "--snr_weight_floor", "0"], "snr_weight_floor must be positive"),
    (["--train_batch_size", "0"], "train_batch_size must be at least 1"),
    (["--learning_rate", "fast"], "invalid float value"),
    (["--no_such_key", "1"], "unknown argument"),
    (["--unet.down_block_types", "[CrossAttnDownBlock2D, DownBlock2D]"], "CrossAttnDownBlock2D"),
    (["--unet.sample_size", "31"], "sample_size"),
    (["--unet.sample_size", "64"], "sample_size"),
    (["--mixed_precision", "fp16"], "fp16"),
    (["--data_dir", "/nonexistent/fashion"], "/nonexistent/fashion"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "not a checkpoint folder"),
    (["--unet.bogus", "1"], r"unknown UNet config key\(s\) \['bogus'\]"),
    (["--unet.norm_num_groups", "0"], "norm_num_groups=0 is not supported"),
    (["--unet.block_out_channels", "16"], "block_out_channels=16 is not supported"),
    (["--unet.block_out_channels", "[16,"], "is not a valid YAML value"),
    (["--learning_rate", "inf"], "learning_rate must be a finite number"),
    (["--adam_beta1", "nan"], "adam_beta1 must be a finite number"),
    (["--max_grad_norm", "inf"], "max_grad_norm must be a finite number"),
    (["--seed", "99999999999999999999"], "seed must be an integer from 0 to 4294967295"),
    (["--train_batch_size", "1000000000"], "more than the .* training images"),
    (["--eval_batch_size", "1000000000"], "lower --eval_batch_size"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, train_data_dir, capsys, extra, message):
    if extra[0] == "--mixed_precision" and torch.cuda.is_available():
        pytest.skip("fp16 is valid on this machine: it has a GPU")
    output_dir = tmp_path / "out"
    data = [] if "--data_dir" in extra else ["--data_dir", train_data_dir]
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(output_dir), *data, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(message, err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not output_dir.exists()


@pytest.mark.parametrize("content, message", [
    ("unet: [16, 32]\n", "unet in config file .* must be a mapping"),
    ("unet: null\n", "unet in config file .* must be a mapping"),
    ("unet: {block_out_channels: 16}\n", "block_out_channels=16 is not supported"),
    (b"\x7fELF\x02\x01\x01\x00\xff\xfe", "is not UTF-8 text"),
])
def test_bad_config_file_is_one_line_exit_2(tmp_path, capsys, content, message):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = train_accelerate.main(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


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


SLOW_BF16 = textwrap.dedent("""
    # Launch the trainer as if this machine had no native bf16.
    import sys
    sys.path.insert(0, {root!r})
    import train_accelerate
    train_accelerate.has_fast_bf16 = lambda device: False
    sys.exit(train_accelerate.main(sys.argv[1:]))
""")


def test_bf16_mixed_precision_on_cpu_with_tensorboard_logging(tmp_path, train_data_dir):
    output_dir = tmp_path / "out"
    launcher = tmp_path / "slow_bf16.py"
    launcher.write_text(SLOW_BF16.format(root=str(ROOT)))
    # A subprocess: Accelerate's process-wide state keeps the precision of the first Accelerator made in a process.
    result = run_training(output_dir, train_data_dir, "--mixed_precision", "bf16", "--logger", "tensorboard",
                          "--max_train_steps", 4, "--checkpointing_steps", 4, "--save_images_steps", 2, script=launcher)
    assert result.stdout.count("has no native bf16, so mixed_precision=bf16 may train slower") == 1
    # `auto` on such a machine trains in float32, and the run folder records it
    run_training(tmp_path / "auto", train_data_dir, "--mixed_precision", "auto", "--max_train_steps", 1,
                 "--save_images_steps", 100, script=launcher)
    assert "mixed_precision: 'no'" in (tmp_path / "auto" / "train_config.yaml").read_text()
    losses = trainer_state(output_dir, 4)["losses"]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    events = list((output_dir / "logs").rglob("events.out.tfevents.*"))
    assert events and all(event.stat().st_size > 0 for event in events)
    published = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in published.values()} == {torch.float32}  # autocast, not bf16 weights


def test_min_snr_v_prediction_and_stratified_timesteps_train_and_publish(tmp_path, train_data_dir):
    common = ("--max_train_steps", 1, "--checkpointing_steps", 1, "--save_images_steps", 100, "--lr_warmup_steps", 0)
    train_in_process(tmp_path / "plain", train_data_dir, *common)
    train_in_process(tmp_path / "weighted", train_data_dir, *common, "--snr_gamma", 5)
    train_in_process(tmp_path / "floored", train_data_dir, *common, "--snr_gamma", 5, "--snr_weight_floor", 1)
    plain, _ = checkpoint_tensors(tmp_path / "plain", 1)
    weighted, _ = checkpoint_tensors(tmp_path / "weighted", 1)
    floored, _ = checkpoint_tensors(tmp_path / "floored", 1)
    assert any(not torch.equal(plain[name], weighted[name]) for name in plain)  # the weights changed the step
    # eps weights min(SNR, 5) / SNR never exceed 1, so a floor of 1 gives every sample weight 1: the plain step
    assert all(torch.equal(plain[name], floored[name]) for name in plain)
    output_dir = tmp_path / "v"
    train_in_process(output_dir, train_data_dir, *common, "--prediction_type", "v_prediction", "--snr_gamma", 5,
                     "--timestep_sampling", "stratified")
    scheduler = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    saved = (output_dir / "train_config.yaml").read_text()
    assert "snr_gamma: 5.0" in saved and "timestep_sampling: stratified" in saved


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


# ---------------------------------------------------------------------------------------------------------------
# Nothing the user made is ever lost (issue 12): run folders, checkpoints, locks, resume rules, faults
# ---------------------------------------------------------------------------------------------------------------

def test_a_folder_with_a_foreign_train_config_is_not_a_run(tmp_path, train_data_dir, capsys):
    folder = tmp_path / "r"
    (folder / "unet").mkdir(parents=True)
    (folder / "train_config.yaml").write_text("model: resnet50\n")
    (folder / "README.md").write_text("notes\n")
    (folder / "unet" / "weights.bin").write_text("x")
    before = tree(folder)
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(folder), "--data_dir", train_data_dir,
                                  "--max_train_steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a ddpm_fashion run" in err and err.count("\n") == 1
    assert tree(folder) == before


def test_a_checkpoint_folder_is_refused_as_output_dir(run_copy, train_data_dir, capsys):
    checkpoint = run_copy / "checkpoints" / "checkpoint-12"
    before = tree(run_copy)
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(checkpoint), "--data_dir",
                                  train_data_dir, "--resume_from_checkpoint", "latest"])
    err = capsys.readouterr().err
    assert code == 2 and "is a checkpoint, not a run folder" in err
    assert tree(run_copy) == before


def test_resuming_from_an_older_checkpoint_is_refused_and_deletes_nothing(run_copy, train_data_dir, capsys):
    before = tree(run_copy)
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(run_copy), "--data_dir", train_data_dir,
                                  "--resume_from_checkpoint", str(run_copy / "checkpoints" / "checkpoint-8"),
                                  "--checkpointing_steps", "4", "--checkpoints_total_limit", "1",
                                  "--max_train_steps", "18"])
    err = capsys.readouterr().err
    assert code == 2 and "is older than" in err and "checkpoint-12" in err, err
    assert tree(run_copy) == before


def test_resume_with_another_unet_or_batch_size_changes_nothing(run_copy, train_data_dir, capsys):
    before = tree(run_copy)
    for override, named in ((["--unet.block_out_channels", "[32, 64]"], "unet.block_out_channels: [16, 32] -> [32, 64]"),
                            (["--train_batch_size", "8"], "1 process(es) x train_batch_size 16 = 16 -> 1 process(es) x 8 = 8")):
        code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(run_copy), "--data_dir",
                                      train_data_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", "16",
                                      *override])
        err = capsys.readouterr().err
        assert code == 2 and "cannot resume from" in err and named in err, err
        assert err.count("\n") == 1
    assert tree(run_copy) == before  # train_config.yaml included


def test_a_damaged_checkpoint_is_named_and_latest_falls_back_to_a_proven_one(run_copy, train_data_dir, capsys):
    weights = run_copy / "checkpoints" / "checkpoint-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(run_copy), "--data_dir", train_data_dir,
                                  "--resume_from_checkpoint", str(weights.parent), "--max_train_steps", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint-12 is damaged: model.safetensors" in err, err
    # latest proves checkpoint-8 complete (manifest sizes and hashes), keeps the damaged one aside, continues
    train_in_process(run_copy, train_data_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", "12",
                     "--checkpointing_steps", "4", "--save_images_steps", "100")
    out = capsys.readouterr()
    assert "resumed from" in out.out + out.err and "checkpoint-8 at step 8" in out.out + out.err
    assert "checkpoint-12-damaged" in out.err
    assert (run_copy / "checkpoints" / "checkpoint-12-damaged" / "model.safetensors").stat().st_size == 100
    assert trainer_state(run_copy, 12)["global_step"] == 12


@pytest.mark.parametrize("damage, message", [
    ("empty", "checkpoint-5 is incomplete: trainer_state.json is missing"),
    ("garbled state", "trainer_state.json is not valid JSON"),
])
def test_a_broken_checkpoint_without_manifest_is_one_line_and_writes_nothing(tmp_path, run_copy, train_data_dir,
                                                                            capsys, damage, message):
    checkpoint = tmp_path / "elsewhere" / "checkpoint-5"
    if damage == "empty":
        checkpoint.mkdir(parents=True)
    else:  # a checkpoint from before manifests, with its trainer state garbled
        shutil.copytree(run_copy / "checkpoints" / "checkpoint-8", checkpoint)
        (checkpoint / "manifest.json").unlink()
        (checkpoint / "trainer_state.json").write_text('{"global_step": 8, "losses": [\x01')
    output_dir = tmp_path / "new"
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(output_dir), "--data_dir",
                                  train_data_dir, "--resume_from_checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not output_dir.exists()


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from ddpm_fashion.guards.files import FolderLock
    from ddpm_fashion.training.run_dir import mark_as_run
    mark_as_run(sys.argv[1])
    lock = FolderLock(sys.argv[1], "run").acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_busy_run_folder_is_refused_naming_the_holder_and_a_dead_holder_holds_nothing(tmp_path, train_data_dir,
                                                                                        capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output_dir)], env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(output_dir)
        code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(output_dir), "--data_dir",
                                      train_data_dir, "--max_train_steps", "2"])
        err = capsys.readouterr().err
        assert code == 2 and "is in use by another run" in err and f"pid {holder.pid}" in err, err
        assert tree(output_dir) == before
    finally:
        holder.kill()
        holder.wait()
    train_in_process(output_dir, train_data_dir, "--max_train_steps", "2", "--save_images_steps", "100")
    assert (output_dir / "model_index.json").is_file()


DELAYED_SAVE = textwrap.dedent("""
    # Launch the trainer with every non-main rank's save_state delayed, so a rename that does not wait fails.
    import sys, time
    import accelerate
    save_state = accelerate.Accelerator.save_state
    def delayed(self, *args, **kwargs):
        if not self.is_main_process:
            time.sleep(1.5 * self.process_index)
        return save_state(self, *args, **kwargs)
    accelerate.Accelerator.save_state = delayed
    sys.path.insert(0, {root!r})
    import train_accelerate
    sys.exit(train_accelerate.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("processes", [2, 3])
def test_every_rank_finishes_its_checkpoint_part_before_the_rename(tmp_path, train_data_dir, processes):
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = tmp_path / "delayed_save.py"
    launcher.write_text(DELAYED_SAVE.format(root=str(ROOT)))
    output_dir = tmp_path / "out"
    run_training(output_dir, train_data_dir, "--max_train_steps", 4, "--checkpointing_steps", 2,
                 "--train_batch_size", 4, "--save_images_steps", 100, script=launcher,
                 launcher=(str(torchrun), "--nproc_per_node", str(processes), "--master_port", str(29520 + processes)))
    for step in (2, 4):
        checkpoint = output_dir / "checkpoints" / f"checkpoint-{step}"
        names = {p.name for p in checkpoint.iterdir()}
        assert {f"random_states_{rank}.pkl" for rank in range(processes)} <= names, names
        run_dir.verify_checkpoint(checkpoint)
    assert not list((output_dir / "checkpoints").glob(STAGING_PREFIX + "*"))
    assert (output_dir / "model_index.json").is_file()


def test_ctrl_c_is_one_line_exit_130_naming_the_checkpoint_to_resume(tmp_path, train_data_dir):
    output_dir = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--config", str(SMOKE), "--output_dir", str(output_dir),
               "--data_dir", str(train_data_dir), "--max_train_steps", "400", "--checkpointing_steps", "2",
               "--save_images_steps", "1000"]
    # A shell without job control starts background jobs with SIGINT ignored, and an ignored signal is inherited:
    # give the trainer the default disposition, as a terminal would, so Python turns Ctrl-C into KeyboardInterrupt.
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (output_dir / "checkpoints" / "checkpoint-2").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("train_accelerate.py: interrupted; the newest checkpoint is "), err[-2000:]
    assert "--resume_from_checkpoint latest" in last and "Traceback" not in err


def test_a_diverged_run_says_precisely_what_is_kept(tmp_path, train_data_dir, capsys):
    output_dir = tmp_path / "out"
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(output_dir), "--data_dir",
                                  train_data_dir, "--learning_rate", "1e30", "--lr_warmup_steps", "0",
                                  "--max_grad_norm", "1e30", "--checkpointing_steps", "1"])
    err = capsys.readouterr().err
    err = error_line(err)
    assert code == 1, err
    step = int(re.search(r"at step (\d+)", err).group(1))
    assert f"checkpoint-{step - 1}, whose weights produced it, is kept as checkpoint-{step - 1}-diverged" in err, err
    assert (output_dir / "checkpoints" / f"checkpoint-{step - 1}-diverged").is_dir()
    left = run_dir.checkpoint_dirs(output_dir)
    if left:
        assert f"the newest checkpoint is {left[-1]}" in err
    else:
        assert "no checkpoint was saved" in err
    assert not (output_dir / "model_index.json").exists()


def test_images_seen_counts_real_images_of_a_short_last_batch(tmp_path, capsys):
    from conftest import write_synthetic_fashion_mnist

    data = tmp_path / "data"
    data.mkdir()
    write_synthetic_fashion_mnist(data, num_train=40, num_test=10)
    output_dir = tmp_path / "out"
    train_in_process(output_dir, data, "--max_train_steps", "3", "--checkpointing_steps", "3",
                     "--save_images_steps", "100")  # batches of 16, 16, 8: one epoch of 40 images
    assert trainer_state(output_dir, 3)["images_seen"] == 40
    assert "| images seen | 40 |" in (output_dir / "README.md").read_text()
    assert "40 images seen" in capsys.readouterr().out


def test_publishing_replaces_only_its_own_files(run_copy, train_data_dir):
    (run_copy / "unet" / "my_notes.txt").write_text("mine")
    (run_copy / "eval.json").write_text("{}")
    train_in_process(run_copy, train_data_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", "13",
                     "--save_images_steps", "100")
    assert (run_copy / "unet" / "my_notes.txt").read_text() == "mine"
    assert (run_copy / "eval.json").read_text() == "{}"
    assert "| optimizer steps | 13 |" in (run_copy / "README.md").read_text()


def test_a_launched_cpu_run_uses_every_core(tmp_path, train_data_dir):
    from ddpm_fashion.training.resources import physical_cores

    if physical_cores() < 2:
        pytest.skip("this machine has one physical core: there is no second one to use")
    accelerate = Path(sys.executable).parent / "accelerate"
    result = run_training(tmp_path / "out", train_data_dir, "--max_train_steps", 1, "--save_images_steps", 100,
                          launcher=(str(accelerate), "launch", "--num_processes", "1"))
    assert f"{physical_cores()} torch threads per process" in result.stdout + result.stderr
    # two processes on this machine share the cores evenly
    torchrun = Path(sys.executable).parent / "torchrun"
    result = run_training(tmp_path / "two", train_data_dir, "--max_train_steps", 1, "--save_images_steps", 100,
                          "--train_batch_size", 8,
                          launcher=(str(torchrun), "--nproc_per_node", "2", "--master_port", "29530"))
    assert f"{max(1, physical_cores() // 2)} torch threads per process" in result.stdout + result.stderr


def test_mixed_precision_is_the_launchers_unless_the_config_sets_it(tmp_path, train_data_dir):
    accelerate = (str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1",
                  "--mixed_precision", "bf16")
    common = ("--max_train_steps", 1, "--save_images_steps", 100)
    result = run_training(tmp_path / "launcher", train_data_dir, *common, launcher=accelerate)
    assert "mixed precision bf16" in result.stdout
    assert "mixed_precision: bf16" in (tmp_path / "launcher" / "train_config.yaml").read_text()
    result = run_training(tmp_path / "config", train_data_dir, *common, "--mixed_precision", "no", launcher=accelerate)
    assert "mixed precision no" in result.stdout
    assert "mixed_precision: 'no'" in (tmp_path / "config" / "train_config.yaml").read_text()


def test_accelerate_dynamo_backend_publishes_a_complete_pipeline_and_resumes_without_it(tmp_path, train_data_dir):
    """`accelerate launch --dynamo_backend ...` hands the trainer a torch.compile'd model: it is saved unwrapped.

    The eager backend compiles (dynamo captures the graphs) without inductor's minutes of code generation.
    """
    accelerate = (str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1",
                  "--dynamo_backend", "eager")
    common = ("--checkpointing_steps", 2, "--save_images_steps", 2)
    result = run_training(tmp_path / "compiled", train_data_dir, "--max_train_steps", 2, *common, launcher=accelerate)
    assert "cannot be saved" not in result.stdout + result.stderr
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "compiled" / weights).is_file()
    # two compiled steps, a checkpoint, two plain steps resumed from it: the weights of four plain steps
    run_training(tmp_path / "compiled", train_data_dir, "--max_train_steps", 4, "--resume_from_checkpoint", "latest",
                 *common)
    run_training(tmp_path / "plain", train_data_dir, "--max_train_steps", 4, *common)
    resumed, plain = load_file(tmp_path / "compiled" / weights), load_file(tmp_path / "plain" / weights)
    assert resumed.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(resumed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bad_input_through_accelerate_launch_shows_our_line(tmp_path):
    """accelerate launch re-raises a failed child as CalledProcessError (README says so); our line is there."""
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--num_processes", "1", "--quiet", str(SCRIPT), "--config", str(SMOKE),
               "--output_dir", str(tmp_path / "out"), "--learning_rate", "-1"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "train_accelerate.py: error: learning_rate must be positive, got -1.0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_every_ablation_row_is_a_valid_config_of_one_epoch():
    from conftest import load_benchmark
    from ddpm_fashion.training.config import parse_config

    ablation = load_benchmark("ablation")
    for name in ablation.ROWS:
        config, _, _ = parse_config(ablation.trainer_args(name, 1, "unused-out"))
        assert 60_000 <= config.max_train_steps * config.train_batch_size < 60_000 + config.train_batch_size, name
        assert config.output_dir == "unused-out" and config.logger == "none"


def test_the_cpu_yaml_ablation_rows_train_what_configs_cpu_yaml_trains_and_trained():
    """The cpu-yaml-noattn row (configs/cpu.yaml since 2026-12-05) differs from configs/cpu.yaml only in length and
    where it writes (bf16 is what cpu.yaml's `auto` picks on a CPU with native bf16, the study's machine); the
    cpu-yaml row, the recipe before, only in the U-Net's attention at 8x8 besides."""
    from dataclasses import asdict

    from conftest import load_benchmark
    from ddpm_fashion.training.config import parse_config

    ablation = load_benchmark("ablation")
    recipe, _, _ = parse_config(["--config", str(ROOT / "configs" / "cpu.yaml")])
    row, _, _ = parse_config(ablation.trainer_args("cpu-yaml-noattn", 1, "unused-out"))
    differing = {key for key, value in asdict(row).items() if asdict(recipe)[key] != value}
    assert {"max_train_steps", "mixed_precision"} <= differing
    assert differing <= {"max_train_steps", "mixed_precision", *ablation.INCIDENTAL_KEYS}, differing
    assert (row.mixed_precision, recipe.mixed_precision) == ("bf16", "auto")
    before, _, _ = parse_config(ablation.trainer_args("cpu-yaml", 1, "unused-out"))
    assert {key for key, value in asdict(before).items() if asdict(row)[key] != value} == {"unet"}
    assert before.unet["down_block_types"] == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]
    assert before.unet["up_block_types"] == ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
    assert {**before.unet, "down_block_types": recipe.unet["down_block_types"],
            "up_block_types": recipe.unet["up_block_types"]} == recipe.unet


def test_fid_curve_scores_each_checkpoint_with_its_own_weights(smoke_run, tmp_path):
    from conftest import load_benchmark

    fid_curve = load_benchmark("fid_curve")
    output_dir, _ = smoke_run
    checkpoints = fid_curve.checkpoint_folders([output_dir / "checkpoints"])
    assert [folder.name for folder in checkpoints] == ["checkpoint-8", "checkpoint-12"]
    assert fid_curve.images_seen(checkpoints[-1]) == (12, 12 * 16)
    # the last checkpoint's EMA weights are exactly what the run published
    published = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    last = fid_curve.pipeline_at(str(output_dir), checkpoints[-1]).unet.state_dict()
    assert sorted(last) == sorted(published)
    assert all(torch.equal(last[name], published[name]) for name in published)
    earlier = fid_curve.pipeline_at(str(output_dir), checkpoints[0]).unet.state_dict()
    assert not all(torch.equal(earlier[name], published[name]) for name in published)
    # --weights raw gives the optimizer's weights even where the checkpoint has an EMA, and they are not the EMA's
    optimized = load_file(checkpoints[-1] / "model.safetensors")
    unet = fid_curve.pipeline_at(str(output_dir), checkpoints[-1], "raw").unet.state_dict()
    assert all(torch.equal(unet[name], optimized[name]) for name in optimized)
    assert not all(torch.equal(unet[name], published[name]) for name in published)
    # a checkpoint of a run without EMA gives its raw weights
    raw = tmp_path / "checkpoint-8"
    shutil.copytree(checkpoints[0], raw)
    (raw / "ema.safetensors").unlink()
    raw_weights = load_file(raw / "model.safetensors")
    unet = fid_curve.pipeline_at(str(output_dir), raw).unet.state_dict()
    assert all(torch.equal(unet[name], raw_weights[name]) for name in raw_weights)


def test_fid_curve_refuses_a_json_it_would_replace(smoke_run, tmp_path, capsys):
    from conftest import load_benchmark

    fid_curve = load_benchmark("fid_curve")
    output_dir, _ = smoke_run
    checkpoint = str(output_dir / "checkpoints" / "checkpoint-8")
    other = {"curves": {"recipe": {"protocol": {"run": "elsewhere"}, "points": {"checkpoint-8": {"fid": 1.0}}}},
             "floors": {}}
    for name, content in (("foreign.json", {"results": [1, 2]}), ("other.json", other)):
        report = tmp_path / name
        report.write_text(json.dumps(content))
        with pytest.raises(SystemExit) as refused:
            fid_curve.main(["--run", str(output_dir), "--checkpoints", checkpoint, "--label", "recipe",
                            "--json", str(report)])
        assert refused.value.code == 2
        message = capsys.readouterr().err.strip()
        assert len(message.splitlines()) == 1 and str(report) in message, message
        assert json.loads(report.read_text()) == content


def test_an_equal_time_ablation_row_trains_the_images_its_speed_buys_in_the_anchor_rows_time(tmp_path):
    from argparse import Namespace

    from conftest import load_benchmark
    from ddpm_fashion.training.config import parse_config

    ablation = load_benchmark("ablation")
    speed = {"cpu-yaml": {"img_per_s": 140.0}, "cpu-yaml-wide": {"img_per_s": 84.0}}
    args = Namespace(equal_time_to="cpu-yaml", epochs=2.0, workdir=str(tmp_path))
    # the anchor trains --epochs in the equal-images study's folder, so that study's run is reused
    assert ablation.row_length("cpu-yaml", args, speed) == (2.0, tmp_path / "cpu-yaml-2ep")
    epochs, folder = ablation.row_length("cpu-yaml-wide", args, speed)
    assert epochs == pytest.approx(1.2) and folder == tmp_path / "cpu-yaml-wide-time-of-cpu-yaml-2ep"
    config, _, _ = parse_config(ablation.trainer_args("cpu-yaml-wide", epochs, "unused-out"))
    assert config.max_train_steps == 72_000 // 32 and config.unet["block_out_channels"] == [48, 96, 192]
    args.equal_time_to = None  # an equal-images study: every row trains --epochs
    assert ablation.row_length("cpu-yaml-wide", args, speed) == (2.0, tmp_path / "cpu-yaml-wide-2ep")
    scores = {"dpm20": {"fid": 1.5, "class_kl": 0.01}, "ddim50": {"fid": 1.6, "class_kl": 0.02}}
    study = {"protocol": {"num_samples": 1000, "equal_time_to": "cpu-yaml"},
             "rows": {"real-train": {"fid": 0.06, "class_kl": 0.002},
                      "cpu-yaml-wide": {"changed": "wide", "images": 72_000, "train_seconds": 900, "img_per_s": 80.0,
                                        **scores}},
             "speed": {"cpu-yaml-wide": {"img_per_s": 84.0}}}
    table = ablation.markdown_table(study).splitlines()
    assert "| images |" in table[0] and table[1].count("|") == table[0].count("|")
    assert table[2] == ("| `cpu-yaml-wide` | wide | 72,000 | 900 | 80.0 | 84.0 | 1.50 (25×) / 0.010 "
                        "| 1.60 (27×) / 0.020 |")
    assert table[3].count("|") == table[0].count("|")


def test_ablation_reuses_a_finished_run_saved_before_the_trainer_gained_a_key(tmp_path):
    """A run saved before snr_weight_floor existed was trained at its default: it is still the row's run."""
    from conftest import load_benchmark

    ablation = load_benchmark("ablation")
    run = tmp_path / "run"
    run.mkdir()
    expected = ablation.resolved_config(ablation.trainer_args("cpu-yaml", 1, run))
    (run / "model_index.json").write_text("{}")
    (run / "train.log").write_text("done: 1875 steps, 60000 images seen, 419 s this session, 143.2 img/s\n")
    old = {k: v for k, v in expected.items() if k != "snr_weight_floor"}
    (run / "train_config.yaml").write_text(yaml.safe_dump({**old, "output_dir": str(run)}))
    assert ablation.finished_run(run, expected) == (143.2, 419)
    (run / "train_config.yaml").write_text(yaml.safe_dump({**old, "snr_weight_floor": 0.1}))  # another row's run
    assert ablation.finished_run(run, expected) is None


def test_ablation_refuses_a_json_of_another_protocol(tmp_path, capsys):
    from conftest import load_benchmark

    ablation = load_benchmark("ablation")
    report = tmp_path / "ablation.json"
    report.write_text(json.dumps({"protocol": {"base_config": "cpu.yaml", "epochs": 2.0}, "rows": {"fp32": {}}}))
    before = report.read_bytes()
    with pytest.raises(SystemExit) as refused:
        ablation.main(["--rows", "fp32", "--workdir", str(tmp_path / "rows"), "--json", str(report)])
    assert refused.value.code == 2
    assert "epochs: 2.0 -> 1.0" in capsys.readouterr().err
    assert report.read_bytes() == before and not (tmp_path / "rows").exists()


def test_the_done_line_times_the_first_step_apart_and_the_ablation_reads_it(smoke_run):
    """torch.compile compiles during the first step: the trainer reports it apart, and the study's table shows it."""
    from conftest import load_benchmark

    ablation = load_benchmark("ablation")
    _, result = smoke_run
    match = ablation.DONE_LINE.search(result.stdout)
    assert match and match["first_step"] is not None, result.stdout[-500:]
    assert float(match["after_first_step"]) > 0 and float(match["first_step"]) > 0
    study = {"protocol": {"num_samples": 1000}, "rows": {"real-train": {"fid": 0.06, "class_kl": 0.002}},
             "speed": {"bf16-v-minsnr5-inductor": {"img_per_s": 80.0, "img_per_s_after_first_step": 160.0,
                                                   "first_step_seconds": 71.0, "steps": 150}}}
    assert "| `bf16-v-minsnr5-inductor` | bf16 + v-prediction + min-SNR-5, torch.compile (`--dynamo_backend " \
           "inductor`) | 150 | 80.0 | 160.0 | 71.0 |" in ablation.markdown_table(study)


def test_fid_curve_trend_recovers_a_power_law():
    from conftest import load_benchmark

    fid_curve = load_benchmark("fid_curve")
    points = [{"images_seen": n, "fid": 8.0 * (n / 1e5) ** -0.5} for n in (1e5, 2e5, 4e5, 8e5)]
    exponent, images = fid_curve.images_for_fid(points, 1.0)
    assert exponent == pytest.approx(0.5) and images == pytest.approx(6.4e6)
    assert fid_curve.images_for_fid(points[:1] + [{"images_seen": 2e5, "fid": 9.0}], 1.0)[1] == float("inf")
    study = {"curves": {"r": {"protocol": {"num_samples": 1000}, "points": dict(enumerate(points))}},
             "floors": {"1000": {"fid": 0.1}}}
    assert fid_curve.trend_lines(study) == [
        "r: FID ~ images^-0.50 over 4 points; 10x the floor (FID 1.000) at ~6,400,000 images (107 epochs)"]


def test_the_committed_reference_model_is_configs_cpu_yaml():
    """README's Results describe benchmarks/results/reference-model as configs/cpu.yaml: changing one alone fails."""
    from diffusers import DDPMPipeline

    from ddpm_fashion.training.config import config_to_yaml, parse_config, with_new_keys_at_defaults

    reference = ROOT / "benchmarks" / "results" / "reference-model"
    config, _, _ = parse_config(["--config", str(ROOT / "configs" / "cpu.yaml")])
    expected = yaml.safe_load(config_to_yaml(config))
    trained = with_new_keys_at_defaults(yaml.safe_load((reference / "train_config.yaml").read_text()))
    how_it_ran = {"output_dir", "mixed_precision"}  # where it was written; `auto` resolved on a bf16 CPU
    assert {k: v for k, v in trained.items() if k not in how_it_ran} == \
        {k: v for k, v in expected.items() if k not in how_it_ran}
    assert (expected["mixed_precision"], trained["mixed_precision"]) == ("auto", "bf16")
    pipe = DDPMPipeline.from_pretrained(reference)  # a plain diffusers pipeline, its weights the EMA ones
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        assert list(getattr(pipe.unet.config, key)) == expected["unet"][key], key
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())
