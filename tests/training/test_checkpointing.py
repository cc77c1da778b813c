"""Checkpoints and resume through train_accelerate.py (ddpm_fashion/training/checkpointing.py, run_dir.py): a bitwise
exact resume, a kill or Ctrl-C at any moment, damaged checkpoints, the run lock, every rank's part of a checkpoint,
diverged runs, and publishing that replaces only its own files."""

import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    ENV,
    MULTI_PROCESS,
    ROOT,
    SCRIPT,
    SMOKE,
    checkpoint_tensors,
    error_line,
    run_training,
    train_in_process,
    trainer_state,
    tree,
)

sys.path.insert(0, str(ROOT))
import train_accelerate  # noqa: E402
from ddpm_fashion.guards.files import STAGING_PREFIX, staging_path  # noqa: E402
from ddpm_fashion.training import run_dir  # noqa: E402


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------------------------
# Nothing the user made is ever lost: run folders, checkpoints, locks, resume rules, faults
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


@pytest.mark.slow
def test_a_checkpoint_folder_is_refused_as_output_dir(run_copy, train_data_dir, capsys):
    checkpoint = run_copy / "checkpoints" / "checkpoint-12"
    before = tree(run_copy)
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(checkpoint), "--data_dir",
                                  train_data_dir, "--resume_from_checkpoint", "latest"])
    err = capsys.readouterr().err
    assert code == 2 and "is a checkpoint, not a run folder" in err
    assert tree(run_copy) == before


@pytest.mark.slow
def test_resuming_from_an_older_checkpoint_is_refused_and_deletes_nothing(run_copy, train_data_dir, capsys):
    before = tree(run_copy)
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(run_copy), "--data_dir", train_data_dir,
                                  "--resume_from_checkpoint", str(run_copy / "checkpoints" / "checkpoint-8"),
                                  "--checkpointing_steps", "4", "--checkpoints_total_limit", "1",
                                  "--max_train_steps", "18"])
    err = capsys.readouterr().err
    assert code == 2 and "is older than" in err and "checkpoint-12" in err, err
    assert tree(run_copy) == before


@pytest.mark.slow
def test_resume_with_another_unet_or_batch_size_changes_nothing(run_copy, train_data_dir, capsys):
    before = tree(run_copy)
    changes = ((["--unet.block_out_channels", "[32, 64]"], "unet.block_out_channels: [16, 32] -> [32, 64]"),
               (["--train_batch_size", "8"], "1 process(es) x train_batch_size 16 = 16 -> 1 process(es) x 8 = 8"))
    for override, named in changes:
        code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(run_copy), "--data_dir",
                                      train_data_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", "16",
                                      *override])
        err = capsys.readouterr().err
        assert code == 2 and "cannot resume from" in err and named in err, err
        assert err.count("\n") == 1
    assert tree(run_copy) == before  # train_config.yaml included


@pytest.mark.slow
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


@pytest.mark.slow
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
            time.sleep(0.75 * self.process_index)  # far longer than rank 0's save of this tiny model
        return save_state(self, *args, **kwargs)
    accelerate.Accelerator.save_state = delayed
    sys.path.insert(0, {root!r})
    import train_accelerate
    sys.exit(train_accelerate.main(sys.argv[1:]))
""")


@pytest.mark.slow
@MULTI_PROCESS
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_publishing_replaces_only_its_own_files(run_copy, train_data_dir):
    (run_copy / "unet" / "my_notes.txt").write_text("mine")
    (run_copy / "eval.json").write_text("{}")
    train_in_process(run_copy, train_data_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", "13",
                     "--save_images_steps", "100")
    assert (run_copy / "unet" / "my_notes.txt").read_text() == "mine"
    assert (run_copy / "eval.json").read_text() == "{}"
    assert "| optimizer steps | 13 |" in (run_copy / "README.md").read_text()
