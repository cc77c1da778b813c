"""ddpm_fashion/training/launch.py: which precision a run trains in, and why, in the words of the start-up line; and
how the trainer takes its launcher's stop signals."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENV
from ddpm_fashion.training.launch import resolve_mixed_precision, why_this_precision


def test_auto_is_bf16_only_where_the_device_runs_it_natively_and_says_so():
    assert resolve_mixed_precision("auto", native_bf16=True) == "bf16"
    assert why_this_precision("auto", native_bf16=True) == "auto: this device runs bf16 natively"
    assert resolve_mixed_precision("auto", native_bf16=False) == "no"
    assert why_this_precision("auto", native_bf16=False) == "auto: this device has no native bf16, so float32"


def test_unset_precision_is_the_launchers_and_says_whose(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision(None, native_bf16=True) == "no"
    assert why_this_precision(None, native_bf16=True) == "no launcher setting: float32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "BF16")  # as `accelerate launch --mixed_precision bf16` sets it
    assert resolve_mixed_precision(None, native_bf16=False) == "bf16"
    assert why_this_precision(None, native_bf16=False) == "the launcher's"
    assert why_this_precision("fp16", native_bf16=False) == "set in the config"


def test_after_an_interrupt_a_second_stop_signal_waits_until_the_report_is_out():
    """accelerate launch sends SIGTERM right after the terminal's SIGINT: once the first has stopped training, a
    real second signal must not end the process before it names the checkpoint to resume."""
    import os
    import signal

    from ddpm_fashion.training.launch import restore_stop_signals, stop_signals_as_interrupts

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        with stop_signals_as_interrupts():
            raise KeyboardInterrupt  # the terminal's Ctrl-C
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher's follow-up: noted, not the default that kills
    os.kill(os.getpid(), signal.SIGINT)
    restore_stop_signals()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with stop_signals_as_interrupts():  # a block that ends normally gives the handlers back at once
        pass
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.slow
def test_only_accelerate_launchs_one_process_launcher_counts_as_relaying_stderr(tmp_path):
    """The trainer waits for the launcher's SIGTERM before its Ctrl-C line only where the launcher copies stderr."""
    script = tmp_path / "relayed.py"
    script.write_text("from ddpm_fashion.training.launch import stderr_relayed_by_accelerate\n"
                      "print(stderr_relayed_by_accelerate())\n")
    accelerate = Path(sys.executable).parent / "accelerate"
    launches = {"python": [sys.executable, str(script)],
                "accelerate launch": [str(accelerate), "launch", "--num_processes", "1", str(script)],
                "torchrun": [str(accelerate.with_name("torchrun")), "--nproc_per_node", "1", "--master_port", "29571",
                             str(script)]}
    answers = {name: subprocess.run(command, env=ENV, capture_output=True, text=True, check=True).stdout.split()[-1]
               for name, command in launches.items()}
    assert answers == {"python": "False", "accelerate launch": "True", "torchrun": "False"}
