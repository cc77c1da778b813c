"""ddpm_fashion/training/launch.py: which precision a run trains in, and why, in the words of the start-up line."""

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

    import pytest

    from ddpm_fashion.training.launch import restore_stop_signals, stop_signals_as_interrupts

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        with stop_signals_as_interrupts():
            raise KeyboardInterrupt  # the terminal's Ctrl-C
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher's follow-up: ignored, not the default that kills
    os.kill(os.getpid(), signal.SIGINT)
    restore_stop_signals()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with stop_signals_as_interrupts():  # a block that ends normally gives the handlers back at once
        pass
    assert {sig: signal.getsignal(sig) for sig in before} == before
