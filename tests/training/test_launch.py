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
