"""The `ddpm-fashion` command line itself (ddpm_fashion/cli.py) on a tiny random pipeline: `python -m ddpm_fashion`,
usage errors, Ctrl-C and out-of-memory reports, and the README's library snippets. Each subcommand's tests are in
tests/commands/, those of the sampling code behind them in tests/sampling/."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_cli
from ddpm_fashion.cli import main
from ddpm_fashion.sampling import generate

REPO_ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- entry points ----------------------------------------------------------------------------------------------

@pytest.mark.slow
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


# ---- errors: one line, exit 2 (or 130 for Ctrl-C), nothing half-written; a bug keeps its traceback -----------

def test_ctrl_c_is_one_line_and_exit_130_with_nothing_half_written(model_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "generate_images", interrupted)
    code, _, stderr = run_cli(["sample", "--model", model_dir, "--num_inference_steps", 2, "--out",
                               tmp_path / "grid.png"], capsys)
    assert code == 130 and stderr.strip() == "ddpm-fashion sample: interrupted"
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
