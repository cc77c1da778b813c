"""Input checks shared by the library, the trainer and the command line: one rule, one message, one place.

A leaf module: it imports nothing of ddpm_fashion, so any module may use it without an import cycle. Every check
raises a one-line ValueError that names the value, what was wrong and what is allowed (argparse types raise
argparse.ArgumentTypeError, which argparse turns into its usual one-line usage error).
"""

import argparse
import math
from typing import Iterable

# torch.Generator.manual_seed takes any 64-bit value, but the trainer derives per-step seeds from it
# (seed * 1_000_003 + step), and numpy's generators take 32 bits: one range everywhere keeps seeds portable.
MAX_SEED = 2**32 - 1


def one_line(error: BaseException) -> str:
    """Get an exception's message on a single line."""
    return " ".join(str(error).split()) or type(error).__name__


def require_choice(name: str, value, choices: Iterable) -> None:
    """Raise a one-line ValueError naming the valid choices when value is not one of them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not supported; choose one of: {', '.join(map(str, choices))}")


def is_int(value) -> bool:
    """Whether value is an integer (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> int:
    """Get value, or raise a one-line ValueError unless it is an integer of at least 1."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_seed(name: str, value) -> int:
    """Get value, or raise a one-line ValueError unless it is an integer seed in [0, MAX_SEED]."""
    if not is_int(value) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer from 0 to {MAX_SEED}, got {value!r}")
    return value


def check_finite(name: str, value) -> float:
    """Get value, or raise a one-line ValueError unless it is a finite number (not nan or inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def _argparse_type(check, text: str, name: str):
    """Run a check on a command-line integer, turning its error into argparse's."""
    try:
        return check(name, int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {_WHAT[check]}, got {text}") from None


_WHAT = {check_positive_int: "a positive integer", check_seed: f"an integer from 0 to {MAX_SEED}"}


def positive_int(text: str) -> int:
    """Parse a command-line integer that must be at least 1 (an argparse type)."""
    return _argparse_type(check_positive_int, text, "value")


def seed(text: str) -> int:
    """Parse a command-line seed, an integer in [0, MAX_SEED] (an argparse type)."""
    return _argparse_type(check_seed, text, "seed")


def check_int_in_range(name: str, value, low: int, high: int) -> int:
    """Get value, or raise a one-line ValueError unless it is an integer in [low, high]."""
    if not is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def int_in_range(low: int, high: int):
    """Get an argparse type parsing a command-line integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            return check_int_in_range("value", int(text), low, high)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text}") from None

    parse.__name__ = f"integer from {low} to {high}"  # argparse names the type in some messages
    return parse
