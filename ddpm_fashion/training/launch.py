"""What the launcher decided, read from the environment it set: processes on CPUs, a launch that started fewer
processes than asked for, the precision to train in, and its signal to stop."""

import os
import signal
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from accelerate.utils import get_int_from_env


def launched_on_cpus_only():
    """Whether a launcher started several processes on a machine without a GPU.

    Accelerate joins such processes into one (gloo) process group only when asked for the CPU: torchrun and
    `accelerate launch --multi_gpu` on a CPU do not ask, and each process would train alone.
    """
    launched = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return launched > 1 and not has_accelerator


def check_launcher(num_processes):
    """Refuse a launch that asked for several processes but started one (before any write).

    `accelerate launch --num_processes N` without --multi_gpu on a machine with fewer than two GPUs runs the script
    once; it still sets MASTER_ADDR for the N processes it did not start.
    """
    launched_by_accelerate = "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ
    if launched_by_accelerate and num_processes == 1 and "WORLD_SIZE" not in os.environ:
        raise ValueError("accelerate launch --num_processes N started 1 process here: without --multi_gpu it runs "
                         "several only on a machine with several GPUs. Add --multi_gpu (on a CPU the N processes "
                         "train as one gloo group; drop --cpu), use torchrun --nproc_per_node N, or pass "
                         "--num_processes 1")


def resolve_mixed_precision(requested, native_bf16):
    """Get the precision to train in: the config's; if null the launcher's, else "no"; "auto": bf16 if native."""
    if requested is None:
        return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()  # set by `accelerate launch`
    if requested == "auto":
        return "bf16" if native_bf16 else "no"
    return requested


def why_this_precision(requested, native_bf16) -> str:
    """Get why resolve_mixed_precision chose what it did, in a few words for the start-up line."""
    if requested == "auto":
        return "auto: this device runs bf16 natively" if native_bf16 else \
            "auto: this device has no native bf16, so float32"
    if requested is None:
        return "the launcher's" if "ACCELERATE_MIXED_PRECISION" in os.environ else "no launcher setting: float32"
    return "set in the config"


class Terminated(KeyboardInterrupt):
    """The launcher told the script to stop (SIGTERM): `accelerate launch` sends it on Ctrl-C, right after the
    terminal's SIGINT, and would otherwise end the script before it says where to resume; torchrun sends it too."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: a second would interrupt the report
    raise Terminated


# The stop-signal handlers a block of stop_signals_as_interrupts found, for restore_stop_signals().
_handlers_before = {}
# Whether the launcher's SIGTERM came after the block ended in an interrupt (see wait_for_the_launchers_stop).
_stop_seen = threading.Event()


def _note_stop(signum, frame):
    _stop_seen.set()


@contextmanager
def stop_signals_as_interrupts():
    """Within the block SIGTERM is a KeyboardInterrupt (Terminated), so it takes Ctrl-C's path (main thread only).

    A block that ends in one leaves SIGINT ignored and SIGTERM noted (not acted on): `accelerate launch` sends
    SIGTERM right after the terminal's SIGINT, and restoring SIGTERM's default here would let it kill the process
    before it says where to resume. The caller reports, then calls restore_stop_signals().
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _handlers_before.update({signal.SIGINT: signal.getsignal(signal.SIGINT),
                             signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated)})
    stopping = False
    _stop_seen.clear()
    try:
        yield
    except KeyboardInterrupt:
        stopping = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _note_stop)
        raise
    finally:
        if not stopping:
            restore_stop_signals()


def restore_stop_signals():
    """Give SIGINT and SIGTERM back the handlers stop_signals_as_interrupts found (an in-process caller's own)."""
    while _handlers_before:
        sig, handler = _handlers_before.popitem()
        signal.signal(sig, handler)


def stderr_relayed_by_accelerate() -> bool:
    """Whether `accelerate launch` started this process alone and copies its stderr through a pipe (its one-process
    launcher; torchrun and accelerate's multi-process launch leave their workers' stderr alone)."""
    if "TORCHELASTIC_RUN_ID" in os.environ or not stat.S_ISFIFO(os.fstat(2).st_mode):
        return False
    try:
        parent = psutil.Process().parent()
        words = parent.cmdline()[:3] if parent is not None else []
    except (psutil.Error, OSError):
        return False
    return any(Path(word).name == "accelerate" or word.startswith("accelerate.commands") for word in words)


def wait_for_the_launchers_stop(interrupt, seconds=5.0):
    """After Ctrl-C under `accelerate launch`, wait (at most `seconds`) for the launcher's SIGTERM before saying
    anything.

    That launcher reads the script's stderr and drops what it has just read when the terminal's SIGINT reaches it:
    a line written before the launcher took its own SIGINT could vanish. Its SIGTERM comes after it did.
    """
    noting_stop = signal.getsignal(signal.SIGTERM) is _note_stop  # an interrupt that ended a training block
    if isinstance(interrupt, Terminated) or not noting_stop or not stderr_relayed_by_accelerate():
        return
    deadline = time.monotonic() + seconds
    while not _stop_seen.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)  # the SIGTERM handler runs between these sleeps (main thread)


@contextmanager
def ignoring_stop_signals():
    """Within the block SIGINT and SIGTERM are ignored: the interrupted trainer's one line is printed whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def is_first_process():
    """Whether this is rank 0 of the launch (every process is told to stop; one says where to resume)."""
    return get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"], 0) == 0

