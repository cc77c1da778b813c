"""ddpm_fashion.training.resources: how many torch threads a process takes, and the bounds on what a user may ask for."""

import os
import sys

import pytest

from ddpm_fashion.training.resources import THREADS_ENV, threads_per_process

from conftest import ROOT

sys.path.insert(0, str(ROOT))
import train_accelerate  # noqa: E402


@pytest.fixture
def two_cpus(monkeypatch):
    """This process may run on two logical CPUs, whatever the machine has."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize("value", ["3", "100000"])
def test_more_threads_than_usable_cpus_is_refused_naming_the_variable_and_range(monkeypatch, two_cpus, value):
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(ValueError) as error:
        threads_per_process()
    assert str(error.value) == (f"DDPM_FASHION_NUM_THREADS={value} is more than the 2 CPUs this process may use; "
                                "set 1 to 2")


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_thread_count_that_is_not_a_positive_integer_names_the_allowed_range(monkeypatch, two_cpus, value):
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(ValueError) as error:
        threads_per_process()
    assert str(error.value) == f"DDPM_FASHION_NUM_THREADS={value!r} must be a whole number from 1 to 2"


def test_as_many_threads_as_usable_cpus_is_allowed(monkeypatch, two_cpus):
    monkeypatch.setenv(THREADS_ENV, "2")
    assert threads_per_process() == (2, THREADS_ENV)


def test_omp_num_threads_above_the_usable_cpus_is_capped_and_the_reason_says_so(monkeypatch, two_cpus):
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert threads_per_process() == (2, "OMP_NUM_THREADS=64 capped to the 2 CPUs this process may use")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads_per_process() == (2, "OMP_NUM_THREADS")


def test_the_trainer_refuses_too_many_threads_before_writing_anything(monkeypatch, tmp_path, train_data_dir, capsys):
    monkeypatch.setenv(THREADS_ENV, "100000")
    code = train_accelerate.main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--output_dir",
                                  str(tmp_path / "out"), "--data_dir", train_data_dir])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "train_accelerate.py: error: DDPM_FASHION_NUM_THREADS=100000" in err, err
    assert not (tmp_path / "out").exists()
