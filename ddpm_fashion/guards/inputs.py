"""Input checks shared by the library, the trainer and the command line: one rule, one message, one place.

A leaf module: it imports nothing of ddpm_fashion, so any module may use it without an import cycle. Every check
raises a one-line ValueError that names the value, what was wrong and what is allowed (argparse types raise
argparse.ArgumentTypeError, which argparse turns into its usual one-line usage error).
"""

import argparse
import math
import numbers
from typing import Iterable, Optional

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


def check_finite(name: str, value) -> float:
    """Get value, or raise a one-line ValueError unless it is a finite real number (numpy's included; not nan/inf)."""
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_real or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {float(value) if is_real else value!r}")
    return value


def _integers(low: int, high: Optional[int]) -> str:
    """Get how a message names the integers in [low, high] (high None: no upper bound)."""
    if high is None:
        return "a positive integer" if low == 1 else f"an integer of at least {low}"
    return f"an integer from {low} to {high}"


def check_int(name: str, value, low: int = 1, high: Optional[int] = None) -> int:
    """Get value, or raise a one-line ValueError unless it is an integer in [low, high] (high None: no bound).

    Seeds are check_int(name, value, 0, MAX_SEED).
    """
    if not is_int(value) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {_integers(low, high)}, got {value!r}")
    return value


def int_arg(low: int = 1, high: Optional[int] = None):
    """Get an argparse type parsing a command-line integer in [low, high], with check_int's rule."""

    def parse(text: str) -> int:
        try:
            return check_int("value", int(text), low, high)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {_integers(low, high)}, got {text}") from None

    parse.__name__ = _integers(low, high)  # argparse names the type in some messages
    return parse


positive_int = int_arg()
seed = int_arg(0, MAX_SEED)
