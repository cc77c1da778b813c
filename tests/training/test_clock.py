"""ddpm_fashion.training.clock: the session's img/s, the first step timed apart, and the expected duration."""

import pytest

from ddpm_fashion.training import clock as clock_module
from ddpm_fashion.training.clock import Clock


@pytest.fixture
def fake_time(monkeypatch):
    """A settable clock instead of time.time."""
    now = [1000.0]
    monkeypatch.setattr(clock_module.time, "time", lambda: now[0])
    return now


def test_the_expected_duration_is_said_once_from_the_steps_after_the_first(fake_time):
    progress = {"losses": [], "images_seen": 0, "train_seconds": 0.0}
    clock, lines = Clock(progress), []
    for step in range(1, 41):
        fake_time[0] += 30.0 if step == 1 else 2.0  # the first step compiles
        progress["images_seen"] += 128
        clock.tick(progress)
        lines.append(clock.expected_duration(steps_left=5000 - step))
    said = [line for line in lines if line]
    assert said == ["timed 19 steps after the first: 2.00 s per step, so the 4980 steps left take about 2.8 h on "
                    "this machine as loaded now"]
    assert lines.index(said[0]) == Clock.STEPS_TO_TIME - 1
    assert progress["train_seconds"] == pytest.approx(30.0 + 39 * 2.0)


def test_a_short_remainder_is_said_in_minutes_and_a_finished_run_says_nothing(fake_time):
    progress = {"losses": [], "images_seen": 0, "train_seconds": None}
    clock = Clock(progress)
    for _ in range(Clock.STEPS_TO_TIME):
        fake_time[0] += 1.5
        clock.tick(progress)
    assert clock.expected_duration(steps_left=100).endswith("take about 2 min on this machine as loaded now")
    assert clock.expected_duration(steps_left=0) is None
    assert progress["train_seconds"] is None  # resumed from a run that did not record its time


def test_the_done_line_gives_img_s_with_and_without_the_first_step(fake_time):
    progress = {"losses": [], "images_seen": 1000, "train_seconds": 0.0}
    clock = Clock(progress)
    for seconds in (10.0, 1.0, 1.0):
        fake_time[0] += seconds
        progress["images_seen"] += 100
        clock.tick(progress)
    assert clock.done_line(3, progress, "out") == ("done: 3 steps, 1300 images seen, 12 s this session, 25.0 img/s "
                                                   "(100.0 after the first step, which took 10.0 s); pipeline in out")


def test_a_checkpoint_is_due_by_time_since_the_last_one_or_the_start(fake_time):
    clock = Clock({"losses": [], "images_seen": 0, "train_seconds": 0.0})
    assert not clock.checkpoint_due(None)
    fake_time[0] += 14 * 60
    assert not clock.checkpoint_due(15)
    fake_time[0] += 60
    assert clock.checkpoint_due(15) and not clock.checkpoint_due(None)
    clock.checkpoint_saved()
    fake_time[0] += 10 * 60
    assert not clock.checkpoint_due(15) and clock.checkpoint_due(10)


def test_the_last_step_that_fits_counts_every_sessions_time_and_is_always_a_step_ahead(fake_time):
    progress = {"losses": [], "images_seen": 0, "train_seconds": 600.0}  # 10 minutes in earlier sessions
    clock = Clock(progress)
    for _ in range(Clock.STEPS_TO_TIME):
        fake_time[0] += 3.0 if clock.steps == 0 else 0.5
        clock.tick(progress)
    # 12.5 s this session, 30 minutes in all: (1800 - 612.5) s at 0.5 s per step
    assert clock.last_step_that_fits(30, step=400, progress=progress) == 400 + 2375
    assert clock.last_step_that_fits(10, step=400, progress=progress) == 401  # the budget is spent: one more step
    progress["train_seconds"] = None  # resumed from a run that did not record its time: this session's counts
    assert clock.last_step_that_fits(1, step=20, progress=progress) == 20 + int((60 - 12.5) / 0.5)
