"""The run folder's rules (ddpm_fashion/training/run_dir.py, checkpointing.py, guards/files.py) as users meet them:
real folders, real processes, a real full disk. Nothing the user made is trained over, deleted or made unreadable."""

import os
import shutil
import stat
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import ROOT, SMOKE, error_line, fill_disk, mounted_tmpfs, run_training, train_in_process, tree

sys.path.insert(0, str(ROOT))
import train_accelerate  # noqa: E402
from ddpm_fashion.guards.files import staging_path  # noqa: E402
from ddpm_fashion.training import run_dir  # noqa: E402

REFERENCE_MODEL = ROOT / "benchmarks" / "results" / "reference-model"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def trainer_main(output_dir, data_dir, *extra):
    """Run the trainer's main() on the smoke config; get its exit code."""
    return train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(output_dir), "--data_dir",
                                  str(data_dir), *map(str, extra)])


def dead_pid():
    """Get the pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------------------------------------------------------
# A finished model is never trained over unless the user asks
# ---------------------------------------------------------------------------------------------------------------

def test_a_copied_pipeline_that_is_not_our_run_is_never_trained_over(tmp_path, train_data_dir, capsys):
    copy = tmp_path / "refcopy"
    shutil.copytree(REFERENCE_MODEL, copy)
    before = tree(copy)
    for extra in ([], ["--overwrite_output_dir"], ["--resume_from_checkpoint", "latest"]):
        assert trainer_main(copy, train_data_dir, *extra) == 2, extra
        err = capsys.readouterr().err
        assert "holds a pipeline that this trainer did not make" in err and err.count("\n") == 1, err
    assert tree(copy) == before


@pytest.mark.slow
def test_a_finished_run_whose_checkpoints_were_deleted_is_trained_over_only_with_overwrite_output_dir(
        run_copy, train_data_dir, capsys):
    shutil.rmtree(run_copy / "checkpoints")  # to save space; the published weights are what the user keeps
    before = tree(run_copy)
    for extra in ([], ["--resume_from_checkpoint", "latest"]):
        assert trainer_main(run_copy, train_data_dir, "--seed", 7, *extra) == 2
        err = capsys.readouterr().err
        assert "holds the published pipeline of an earlier run" in err and "--overwrite_output_dir" in err, err
        assert err.count("\n") == 1
    assert tree(run_copy) == before
    assert trainer_main(run_copy, train_data_dir, "--overwrite_output_dir", "--resume_from_checkpoint", "latest") == 2
    assert "pass one of them" in capsys.readouterr().err
    assert tree(run_copy) == before

    train_in_process(run_copy, train_data_dir, "--seed", 7, "--overwrite_output_dir", "--max_train_steps", 2,
                     "--save_images_steps", 100)
    err = capsys.readouterr().err
    assert "--overwrite_output_dir: training a new run over" in err and "model_index.json" in err, err
    assert (run_copy / WEIGHTS).read_bytes() != before[WEIGHTS]
    assert load_file(run_copy / WEIGHTS)  # the new run's weights, published
    assert "seed: 7" in (run_copy / "train_config.yaml").read_text()


@pytest.mark.slow
def test_overwrite_output_dir_replaces_the_earlier_checkpoints_and_keeps_the_users_files(run_copy, train_data_dir,
                                                                                       capsys):
    (run_copy / "checkpoints" / "notes.txt").write_text("mine")
    assert trainer_main(run_copy, train_data_dir, "--max_train_steps", 2) == 2
    assert "has checkpoints from an earlier run" in capsys.readouterr().err
    train_in_process(run_copy, train_data_dir, "--overwrite_output_dir", "--max_train_steps", 2,
                     "--checkpointing_steps", 1, "--save_images_steps", 100)
    err = capsys.readouterr().err
    assert "checkpoints/checkpoint-8, checkpoints/checkpoint-12" in err, err
    assert [p.name for p in run_dir.checkpoint_dirs(run_copy)] == ["checkpoint-1", "checkpoint-2"]
    assert (run_copy / "checkpoints" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------------
# Only staging we can prove is ours, and dead, is ever removed
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_user_files_named_like_temporaries_survive_and_only_a_dead_writers_staging_is_removed(run_copy,
                                                                                             train_data_dir):
    checkpoints = run_copy / "checkpoints"
    users = [run_copy / ".tmp-mynotes.txt", run_copy / ".tmp-data" / "x.bin", checkpoints / ".tmp-mynotes.txt",
             checkpoints / ".tmp-checkpoint-6" / "model.safetensors"]
    for path in users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    dead = staging_path(checkpoints / "checkpoint-14", owner=dead_pid())
    (dead / "partial").mkdir(parents=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        running = staging_path(run_copy / "pipeline", owner=alive.pid)
        running.mkdir()
        train_in_process(run_copy, train_data_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", 13,
                         "--save_images_steps", 100)
        assert running.is_dir()  # its writer may still be writing
    finally:
        alive.kill()
        alive.wait()
    assert not dead.exists()
    assert all(path.read_text() == "mine" for path in users)


# ---------------------------------------------------------------------------------------------------------------
# Output folders that cannot be used are one line, before anything is written
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("long name", "the name has 300 bytes; at most 255 are allowed here"),
    ("dangling symlink", "is a symbolic link to"),
    ("lock is a directory", "that is not a lock file"),
])
def test_an_output_dir_that_cannot_be_used_is_one_line_exit_2_and_writes_nothing(tmp_path, train_data_dir, capsys,
                                                                                 case, message):
    output_dir = tmp_path / "out"
    if case == "long name":
        output_dir = tmp_path / ("x" * 300)
    elif case == "dangling symlink":
        output_dir.symlink_to(tmp_path / "nowhere")
    else:
        (output_dir / ".lock").mkdir(parents=True)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert trainer_main(output_dir, train_data_dir, "--max_train_steps", 1) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------------------------------------------
# Everything written can be read by whoever the umask lets read it
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_every_file_written_gets_the_mode_the_umask_gives(tmp_path, train_data_dir, umask):
    output_dir = tmp_path / "out"
    previous = os.umask(umask)
    try:
        train_in_process(output_dir, train_data_dir, "--max_train_steps", 2, "--checkpointing_steps", 1,
                         "--save_images_steps", 100)
    finally:
        os.umask(previous)
    paths = [output_dir, *output_dir.rglob("*")]
    assert any(p.name == "model.safetensors" for p in paths) and (output_dir / WEIGHTS).is_file()
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    expected = {name: (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask for name in modes}
    assert modes == expected


# ---------------------------------------------------------------------------------------------------------------
# A real full disk
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 12 MB file system (tmpfs): a few smoke checkpoints fill it."""
    with mounted_tmpfs(tmp_path / "disk", "12m") as mount:
        yield mount


@pytest.mark.slow
def test_checkpointing_until_the_disk_fills_is_one_line_and_keeps_every_complete_checkpoint(small_disk,
                                                                                           train_data_dir):
    output_dir = small_disk / "run"
    result = run_training(output_dir, train_data_dir, "--max_train_steps", 60, "--checkpointing_steps", 1,
                          "--checkpoints_total_limit", 1000, "--save_images_steps", 100, expect=1)
    line = error_line(result.stderr)
    assert "no space left on the device while writing" in line and str(output_dir / "checkpoints") in line, line
    assert " MB are free" in line
    kept = run_dir.checkpoint_dirs(output_dir)
    assert len(kept) >= 2
    for checkpoint in kept:
        run_dir.verify_checkpoint(checkpoint)  # every checkpoint left is whole
    assert not [p for p in (output_dir / "checkpoints").iterdir() if p not in kept]  # the partial one is gone
    assert not (output_dir / "model_index.json").exists()


@pytest.mark.slow
def test_publishing_onto_a_nearly_full_disk_is_one_line_and_keeps_the_old_pipeline(small_disk, run_copy,
                                                                                   train_data_dir):
    output_dir = small_disk / "run"
    shutil.copytree(run_copy, output_dir)
    before = tree(output_dir)
    fill_disk(small_disk, leave_bytes=150_000)  # room for the run's small files, not for the new weights
    result = run_training(output_dir, train_data_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", 12,
                          expect=1)
    line = error_line(result.stderr)
    assert "no space left on the device while writing" in line, line
    for name in ("model_index.json", WEIGHTS, "README.md", "samples.png", "loss.png"):
        assert (output_dir / name).read_bytes() == before[name], name
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(p.name for p in run_copy.iterdir())


def test_a_first_run_that_fails_before_any_checkpoint_leaves_no_run_folder(tmp_path, train_data_dir, capsys):
    output_dir = tmp_path / "out"
    code = trainer_main(output_dir, train_data_dir, "--learning_rate", "1e30", "--lr_warmup_steps", "0",
                        "--max_grad_norm", "1e30", "--checkpointing_steps", "100")
    assert code == 1 and "loss became" in capsys.readouterr().err
    assert not output_dir.exists()
    # a folder the user made is never removed, even when the run in it failed
    output_dir.mkdir()
    assert trainer_main(output_dir, train_data_dir, "--learning_rate", "1e30", "--lr_warmup_steps", "0",
                        "--max_grad_norm", "1e30", "--checkpointing_steps", "100") == 1
    assert output_dir.is_dir()
