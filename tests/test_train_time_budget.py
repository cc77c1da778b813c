"""train_accelerate.py with max_train_minutes: the run ends at the step that fits the time, its learning-rate schedule
decayed to the end, exactly as a run given that step count trains; a resumed run keeps the plan; several processes
stop together at the main process's plan."""

import contextlib
import io
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import MULTI_PROCESS, ROOT, SMOKE, checkpoint_tensors, run_training, train_in_process, trainer_state

BIN = Path(sys.executable).parent
# A budget of 3 s on the smoke U-Net, far short of the cap. The plan is made at step 20, before that step's checkpoint:
# it ends at step 21 or later (what fits, if more), so a resume from checkpoint-20 has the plan to keep. The warm-up
# covers the timed steps (configs/cpu.yaml: 200), so the learning rates before the plan do not depend on the total.
BUDGET = ("--max_train_minutes", 0.05, "--max_train_steps", 100_000, "--checkpointing_steps", 20,
          "--checkpoints_total_limit", "null", "--save_images_steps", 100_000, "--lr_warmup_steps", 20)
PLAN_LINE = re.compile(r"max_train_minutes 0\.05: training to step (\d+) of max_train_steps 100000, the learning-rate "
                       r"schedule fitted to it")


def planned_steps(printed):
    """Get the step count of the trainer's one plan line (and fail unless there is exactly one)."""
    found = PLAN_LINE.findall(printed)
    assert len(found) == 1, printed[-2000:]
    return int(found[0])


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, train_data_dir):
    """A smoke run under a 3-second budget, and the step count it planned."""
    folder, printed = tmp_path_factory.mktemp("budget") / "run", io.StringIO()
    with contextlib.redirect_stdout(printed):  # the plan line is the progress bar's (tqdm.write: stdout)
        train_in_process(folder, train_data_dir, *BUDGET)
    return folder, planned_steps(printed.getvalue())


def test_a_time_budget_ends_the_run_at_its_planned_step_with_the_learning_rate_decayed_to_zero(budget_run):
    folder, steps = budget_run
    assert 20 < steps < 100_000
    state = trainer_state(folder, steps)
    assert len(state["losses"]) == steps
    assert state["lr_scheduler"]["last_epoch"] == steps
    assert state["lr_scheduler"]["_last_lr"] == [pytest.approx(0.0, abs=1e-12)]  # the cosine decay completed
    assert state["time_plan"] == {"max_train_minutes": 0.05, "max_train_steps": 100_000, "steps": steps}
    assert sorted(p.name for p in (folder / "checkpoints").iterdir())[-1] == f"checkpoint-{steps}"


def test_a_planned_run_trains_exactly_what_that_many_max_train_steps_train(budget_run, tmp_path, train_data_dir):
    folder, steps = budget_run
    train_in_process(tmp_path / "fixed", train_data_dir, "--max_train_steps", steps, "--checkpointing_steps", steps,
                     "--save_images_steps", 100_000, "--lr_warmup_steps", 20)
    assert trainer_state(tmp_path / "fixed", steps)["losses"] == trainer_state(folder, steps)["losses"]
    for planned, fixed in zip(checkpoint_tensors(folder, steps), checkpoint_tensors(tmp_path / "fixed", steps)):
        for key in fixed:
            assert torch.equal(planned[key], fixed[key]), key


def test_a_resumed_run_keeps_its_plan_and_ends_where_the_straight_run_did(budget_run, tmp_path, train_data_dir,
                                                                          capsys):
    folder, steps = budget_run
    resumed = tmp_path / "resumed"
    shutil.copytree(folder, resumed)
    for later in (resumed / "checkpoints").iterdir():
        if later.name != "checkpoint-20":
            shutil.rmtree(later)
    train_in_process(resumed, train_data_dir, *BUDGET, "--resume_from_checkpoint", "latest")
    printed = capsys.readouterr()
    assert not PLAN_LINE.search(printed.out + printed.err)  # kept, not made again at this session's speed
    assert f"training to step {steps} with 1 process(es)" in printed.out
    for straight, again in zip(checkpoint_tensors(folder, steps), checkpoint_tensors(resumed, steps)):
        for key in straight:
            assert torch.equal(straight[key], again[key]), key


@pytest.mark.slow
@MULTI_PROCESS
@pytest.mark.parametrize("processes", [2, 3])
def test_every_process_stops_at_the_main_processs_plan(tmp_path, train_data_dir, processes):
    launcher = (str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--master_port", str(29560 + processes))
    # each process times its own steps: had each planned alone, one would wait for the others forever at the end
    result = run_training(tmp_path / "run", train_data_dir, *BUDGET, "--train_batch_size", 4, launcher=launcher)
    steps = planned_steps(result.stdout + result.stderr)
    assert trainer_state(tmp_path / "run", steps)["time_plan"]["steps"] == steps
    assert f"done: {steps} steps" in result.stdout


@pytest.mark.parametrize("minutes", ["0", "-5", "nan"])
def test_a_time_budget_must_be_a_positive_number_of_minutes(tmp_path, train_data_dir, minutes, capsys):
    sys.path.insert(0, str(ROOT))
    import train_accelerate

    assert train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(tmp_path / "run"), "--data_dir",
                                  str(train_data_dir), "--max_train_minutes", minutes]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "max_train_minutes" in error, error
    assert not (tmp_path / "run").exists()
