"""The README's launchers exactly as typed, on a machine without a GPU and with no extra variable: each trains with the
processes it asked for, or is refused up front in one line; and a run resumes across process counts."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import (
    ENV,
    MULTI_PROCESS,
    ROOT,
    SMOKE,
    checkpoint_tensors,
    run_training,
    train_in_process,
    trainer_state,
    tree,
)
from ddpm_fashion.training.resources import physical_cores

pytestmark = [pytest.mark.slow, MULTI_PROCESS]
BIN = Path(sys.executable).parent
STEPS = ("--max_train_steps", 4, "--checkpointing_steps", 2, "--save_images_steps", 100)


def processes_trained(result):
    """Get N from the trainer's start-up line 'training to step ... with N process(es)'."""
    line = next(line for line in result.stdout.splitlines() if line.startswith("training to step"))
    return int(line.split(" with ")[1].split()[0])


@pytest.fixture(autouse=True)
def _no_gpu():
    if torch.cuda.is_available():
        pytest.skip("these launches are the CPU-only case; this machine has a GPU")


@pytest.mark.parametrize("launcher", [  # torchrun with 2: the README's command below
    ("torchrun", "--nproc_per_node", "3"),
    ("accelerate", "launch", "--multi_gpu", "--num_processes", "2"),
])
def test_a_launcher_asking_for_n_processes_on_a_cpu_trains_with_n(tmp_path, train_data_dir, launcher):
    processes = int(launcher[-1])
    result = run_training(tmp_path / "out", train_data_dir, *STEPS, "--train_batch_size", 4,
                          launcher=(str(BIN / launcher[0]), *launcher[1:]))
    assert processes_trained(result) == processes
    assert trainer_state(tmp_path / "out", 4)["sampler"]["world_size"] == processes
    assert trainer_state(tmp_path / "out", 4)["images_seen"] == 4 * 4 * processes


@pytest.mark.parametrize("flags", [("--num_processes", "2"), ("--cpu", "--num_processes", "3")])
def test_accelerate_launch_that_would_start_one_process_instead_of_n_is_refused_in_one_line(tmp_path, train_data_dir,
                                                                                           flags):
    command = [str(BIN / "accelerate"), "launch", "--quiet", *flags, str(ROOT / "train_accelerate.py"), "--config",
               str(SMOKE), "--output_dir", str(tmp_path / "out"), "--data_dir", str(train_data_dir)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "train_accelerate.py: error:" in line]
    assert len(lines) == 1 and "Add --multi_gpu" in lines[0] and "torchrun --nproc_per_node N" in lines[0], \
        result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_the_readme_torchrun_command_as_typed_trains_with_two_processes(tmp_path, train_data_dir):
    """Run from the repository root with a relative script path, exactly as the README shows it."""
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "train_accelerate.py", "--config",
               "configs/smoke.yaml", "--output_dir", str(tmp_path / "D"), "--data_dir", str(train_data_dir),
               "--max_train_steps", "2"]
    result = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert processes_trained(result) == 2
    assert (tmp_path / "D" / "model_index.json").is_file()
    # the two processes share the cores evenly
    assert f"{max(1, physical_cores() // 2)} torch threads per process" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Resume across process counts: N processes x batch B continue a run of M processes x batch N*B/M
# ---------------------------------------------------------------------------------------------------------------

def torchrun(processes, port):
    """The torchrun launcher for `processes` processes."""
    return (str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--master_port", str(port))


GLOBAL_BATCH = 12
RESUME_COMMON = ("--checkpointing_steps", 3, "--save_images_steps", 100, "--lr_scheduler", "constant")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, train_data_dir):
    """Six steps of one process with the global batch: what every split run must reproduce."""
    folder = tmp_path_factory.mktemp("straight") / "run"
    train_in_process(folder, train_data_dir, *RESUME_COMMON, "--max_train_steps", 6, "--train_batch_size", GLOBAL_BATCH)
    return folder


@pytest.fixture(scope="module")
def first_half_one_process(tmp_path_factory, train_data_dir):
    """The first three of those steps, by one process (`python train_accelerate.py`, run in this process)."""
    folder = tmp_path_factory.mktemp("half") / "run"
    train_in_process(folder, train_data_dir, *RESUME_COMMON, "--max_train_steps", 3, "--train_batch_size", GLOBAL_BATCH)
    return folder


@pytest.mark.parametrize("before, after", [(1, 2), (1, 3), (2, 1)])
def test_a_run_resumed_with_another_process_count_continues_as_the_straight_run(tmp_path, train_data_dir, straight_run,
                                                                                first_half_one_process, before, after):
    split = tmp_path / "split"
    if before == 1:
        shutil.copytree(first_half_one_process, split)
    else:
        run_training(split, train_data_dir, *RESUME_COMMON, "--max_train_steps", 3,
                     "--train_batch_size", GLOBAL_BATCH // before, launcher=torchrun(before, 29540 + after))
    rest = (*RESUME_COMMON, "--max_train_steps", 6, "--train_batch_size", GLOBAL_BATCH // after,
            "--resume_from_checkpoint", "latest")
    if after == 1:
        train_in_process(split, train_data_dir, *rest)
    else:
        assert processes_trained(run_training(split, train_data_dir, *rest,
                                              launcher=torchrun(after, 29550 + after))) == after
    assert trainer_state(split, 6)["sampler"]["world_size"] == after
    assert trainer_state(split, 6)["losses"] == pytest.approx(trainer_state(straight_run, 6)["losses"], rel=1e-5)
    straight, _ = checkpoint_tensors(straight_run, 6)
    resumed, _ = checkpoint_tensors(split, 6)
    for key in straight:  # as in the 2-vs-1-process test: float rounding, measured against an update's size
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-5, msg=key)


def test_resuming_with_another_global_batch_is_refused_naming_both_process_counts(run_copy, train_data_dir):
    before = tree(run_copy)
    result = run_training(run_copy, train_data_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", 16,
                          launcher=torchrun(2, 29561), expect=1)
    line = next(line for line in result.stderr.splitlines() if "train_accelerate.py: error:" in line)
    assert "1 process(es) x train_batch_size 16 = 16 -> 2 process(es) x 16 = 32" in line, line
    assert "with 2 process(es) pass --train_batch_size 8" in line
    assert tree(run_copy) == before


def training_past_its_first_checkpoint(output_dir, train_data_dir, launcher):
    """Start a long smoke run under `launcher` in its own session and return it once checkpoint-2 is complete."""
    command = [str(BIN / launcher[0]), *launcher[1:], str(ROOT / "train_accelerate.py"), "--config", str(SMOKE),
               "--output_dir", str(output_dir), "--data_dir", str(train_data_dir), "--max_train_steps", "400",
               "--checkpointing_steps", "2", "--save_images_steps", "1000", "--train_batch_size", "8"]
    # Its own session, so the signal goes to the launcher and its children together, as a terminal's Ctrl-C does;
    # and SIGINT's default disposition, as a terminal gives it (a shell's background job inherits it ignored).
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (output_dir / "checkpoints" / "checkpoint-2").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    return process


def assert_one_line_names_the_checkpoint(process, exit_code):
    _, err = process.communicate(timeout=120)
    assert process.returncode == exit_code, err[-2000:]
    ours = [line for line in err.splitlines() if line.startswith("train_accelerate.py: interrupted")]
    assert len(ours) == 1, err[-2000:]
    assert "the newest checkpoint is" in ours[0] and "--resume_from_checkpoint latest" in ours[0]


@pytest.mark.parametrize("launcher, exit_code", [
    (("accelerate", "launch", "--num_processes", "1"), 130),  # accelerate answers Ctrl-C with SIGTERM to the script
    (("torchrun", "--nproc_per_node", "2"), 1),  # torchrun adds its own SignalException report and exits 1
])
def test_ctrl_c_under_each_launcher_names_the_checkpoint_to_resume_once(tmp_path, train_data_dir, launcher,
                                                                         exit_code):
    process = training_past_its_first_checkpoint(tmp_path / "out", train_data_dir, launcher)
    os.killpg(process.pid, signal.SIGINT)
    assert_one_line_names_the_checkpoint(process, exit_code)


def test_ctrl_c_under_accelerate_launch_says_its_line_only_once_the_launcher_has_taken_the_signal(tmp_path,
                                                                                                   train_data_dir):
    # accelerate's launcher copies the script's stderr and, on SIGINT, drops the chunk it has just read: a line the
    # trainer wrote before the launcher took its own SIGINT vanished on a busy machine (CI). Delay the launcher
    # deterministically (stopped while the Ctrl-C reaches both): the trainer must still be waiting, not done.
    process = training_past_its_first_checkpoint(tmp_path / "out", train_data_dir,
                                                 ("accelerate", "launch", "--num_processes", "1"))
    trainer = psutil.Process(process.pid).children()[0]
    os.kill(process.pid, signal.SIGSTOP)
    try:
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(2)  # the trainer answers Ctrl-C within a tenth of a second once nothing holds it
        assert trainer.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD), \
            "the trainer finished while its launcher had not yet taken the Ctrl-C"
    finally:
        os.kill(process.pid, signal.SIGCONT)
    assert_one_line_names_the_checkpoint(process, 130)


SLOW_SIBLING_CHECK = """
# Launch the trainer with rank 1 holding its check of the run folder's lock for 3 s, so rank 0 checks and locks the
# folder while its sibling is still looking at it.
import os, sys, time
from ddpm_fashion.guards import files
check = files._lock_or_name_holder
def slow(handle, what, **kwargs):
    check(handle, what, **kwargs)
    if os.environ.get("RANK") == "1":
        time.sleep(3)
files._lock_or_name_holder = slow
sys.path.insert(0, {root!r})
import train_accelerate
sys.exit(train_accelerate.main(sys.argv[1:]))
"""


def test_the_processes_of_one_launch_never_refuse_each_other_at_the_folder_lock(run_copy, train_data_dir, tmp_path):
    launcher = tmp_path / "slow_sibling_check.py"
    launcher.write_text(SLOW_SIBLING_CHECK.format(root=str(ROOT)))
    result = run_training(run_copy, train_data_dir, "--resume_from_checkpoint", "latest", "--max_train_steps", 13,
                          "--train_batch_size", 8, "--save_images_steps", 100, script=launcher,
                          launcher=torchrun(2, 29562))
    assert processes_trained(result) == 2 and "in use by another run" not in result.stderr
