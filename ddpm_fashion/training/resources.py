"""What the machine gives a run: CPU threads per process, and memory for a batch.

A leaf module: it imports nothing of ddpm_fashion.
"""

import copy
import os
import weakref
from typing import Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Set this to force the number of torch threads per process (the launchers' OMP_NUM_THREADS=1 default is not a choice).
THREADS_ENV = "DDPM_FASHION_NUM_THREADS"


def usable_cpus() -> int:
    """Get the logical CPUs this process may run on (taskset / cgroup limits; all of them where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Get the physical CPU cores this process may run on (hyper-threads do not speed up matrix products)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        logical = psutil.cpu_count(logical=True) or cores
    except ImportError:
        cores = logical = os.cpu_count() or 1
    allowed = usable_cpus()
    # Scale the physical count by the share of logical CPUs we may use.
    return max(1, min(cores, round(cores * allowed / logical)))


def local_processes() -> int:
    """Get how many processes of this run share this machine (set by torchrun and accelerate launch)."""
    for name in ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def threads_per_process() -> Tuple[int, str]:
    """Get the torch threads this process should use, and why.

    An explicit DDPM_FASHION_NUM_THREADS wins; then an OMP_NUM_THREADS other than 1 (the user's). A missing
    OMP_NUM_THREADS or the value 1 is what `accelerate launch` (without --cpu) and `torchrun` set by default, not
    a choice, so it becomes an even share of the physical cores among this machine's processes. More threads than
    the CPUs this process may run on only slow it down (and a huge count crashes libgomp): DDPM_FASHION_NUM_THREADS
    above that is refused, OMP_NUM_THREADS (the user's setting for every program) is capped to it.
    """
    cpus = usable_cpus()
    explicit = os.environ.get(THREADS_ENV, "")
    if explicit:
        if not explicit.isdigit() or int(explicit) < 1:
            raise ValueError(f"{THREADS_ENV}={explicit!r} must be a whole number from 1 to {cpus}")
        if int(explicit) > cpus:
            raise ValueError(f"{THREADS_ENV}={explicit} is more than the {cpus} CPUs this process may use; "
                             f"set 1 to {cpus}")
        return int(explicit), THREADS_ENV
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 1:
        if int(omp) > cpus:
            return cpus, f"OMP_NUM_THREADS={omp} capped to the {cpus} CPUs this process may use"
        return int(omp), "OMP_NUM_THREADS"
    processes = local_processes()
    share = max(1, physical_cores() // processes)
    return share, f"{physical_cores()} physical cores / {processes} process{'es' if processes > 1 else ''}"


def configure_threads() -> Tuple[int, str]:
    """Set torch's intra-op threads for this process (see threads_per_process); get (threads, why)."""
    threads, why = threads_per_process()
    torch.set_num_threads(threads)
    return threads, why


def has_fast_bf16(device: torch.device) -> bool:
    """Tell whether bf16 matrix products run natively on the device (a CPU: oneDNN's bf16 kernels, AVX-512 or AMX)."""
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def available_memory(device: torch.device) -> Optional[int]:
    """Get the bytes of memory free for tensors on a device (None if unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Memory a U-Net batch needs, measured by running the network on the meta device (shapes, no storage)
# ----------------------------------------------------------------------------------------------------------------

# Training holds each parameter as weight, two AdamW moments and an EMA copy (gradients are measured).
TRAINING_PARAMETER_COPIES = 4
# What a run needs when one of its tensors has more bytes than 64-bit sizes count.
UNADDRESSABLE = 2**63


class _LiveTensorBytes(TorchDispatchMode):
    """Count the bytes of the tensors alive while operations run, and their peak (views share their base's)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, count):
        self.live -= count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(outputs):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs and not tensor._is_view():
                count = tensor.numel() * tensor.element_size()
                self.live += count
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._freed, count)
        return outputs


def measure_unet_bytes(unet: torch.nn.Module, batch_size: int, training: bool = False) -> int:
    """Get the memory one U-Net forward (with training, forward and backward) of a batch needs, in fp32.

    A copy of the network runs on the meta device, where tensors have shapes but no storage, so any batch size costs
    nothing: the peak of the activation bytes alive (autograd's saved tensors and the gradients included) plus the
    parameters, held TRAINING_PARAMETER_COPIES times when training. Mixed precision needs less.
    """
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    meta = copy.deepcopy(unet).to("meta")
    sample = torch.empty(batch_size, unet.config.in_channels, height, width, device="meta")
    timesteps = torch.zeros(batch_size, dtype=torch.long, device="meta")
    counter = _LiveTensorBytes()
    # Packing a saved tensor as itself keeps its Python object alive as long as autograd holds it, so it stays counted.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), counter:
        try:
            if training:
                meta(sample, timesteps).sample.float().pow(2).mean().backward()
            else:
                with torch.no_grad():
                    meta(sample, timesteps)
        except RuntimeError as error:
            if "overflow" not in str(error):
                raise
            return UNADDRESSABLE  # a tensor too large for 64-bit sizes: no machine holds it
    parameters = sum(p.numel() * p.element_size() for p in unet.parameters())
    return counter.peak + parameters * (TRAINING_PARAMETER_COPIES if training else 1)


def format_bytes(count: int) -> str:
    """Get a byte count as a short human-readable size (e.g. '3.2 GB')."""
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if count < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000


def check_memory(needed_bytes: int, device, what: str, option: str) -> None:
    """Raise a one-line ValueError naming the option to lower when `what` needs more memory than the device has free."""
    device = torch.device(device)
    available = available_memory(device)
    if available is not None and needed_bytes > available:
        raise ValueError(f"{what} needs about {format_bytes(needed_bytes)} of memory, more than the "
                         f"{format_bytes(available)} free on {device.type}; lower {option}")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an error means a tensor could not be allocated (GPU or CPU), so a smaller size would run."""
    if isinstance(error, MemoryError) or isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("DefaultCPUAllocator: can't allocate memory" in message
                                                or "CUDA out of memory" in message)
