"""What the machine gives a run: CPU threads per process, and memory for a batch.

A leaf module: it imports nothing of ddpm_fashion.
"""

import os
from typing import List, Optional, Tuple

import torch

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
    """Tell whether bf16 matrix products run natively on the device (on a CPU: oneDNN's bf16 kernels, AVX-512 or AMX)."""
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
# Memory a U-Net batch needs: a rough upper bound from feature-map sizes, to refuse absurd sizes before any work
# ----------------------------------------------------------------------------------------------------------------

FLOAT_BYTES = 4  # fp32; mixed precision needs less, so the bound still holds
# Feature maps alive at once besides the skip connections during a forward (input, normed, activated, convolved,
# the concatenated skip, the output): a generous count, since the estimate only has to catch absurd sizes.
LIVE_MAPS = 6
# Activations autograd keeps per resnet block (two norms, two activations, two convolutions, the residual sum and
# the time-embedding add) and per attention block (norm, q, k, v, output); the score matrices come on top.
SAVED_PER_RESNET = 8
SAVED_PER_ATTENTION = 5
# Training holds each parameter as weight, gradient, two AdamW moments and an EMA copy.
TRAINING_PARAMETER_COPIES = 5


def _sample_shape(sample_size) -> Tuple[int, int]:
    """Get (height, width) from a U-Net config's sample_size (an int or a pair), or raise a one-line ValueError."""
    size = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in size)):
        raise ValueError(f"sample_size must be a positive integer or a pair of them, got {sample_size!r}")
    return size[0], size[1]


def _unet_levels(unet_config: dict) -> List[Tuple[int, int, bool, int]]:
    """Get (channels, pixels per map, has attention, attention heads) of each U-Net level, from its config."""
    height, width = _sample_shape(unet_config.get("sample_size"))
    channels = unet_config.get("block_out_channels")
    if not isinstance(channels, (list, tuple)) or not channels or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels):
        raise ValueError(f"block_out_channels must be a list of positive integers, got {channels!r}")
    block_types = list(unet_config.get("down_block_types") or ())
    head_dim = unet_config.get("attention_head_dim")
    levels = []
    for level, width_channels in enumerate(channels):
        attention = level < len(block_types) and "Attn" in str(block_types[level])
        heads = max(1, width_channels // head_dim) if isinstance(head_dim, int) and head_dim > 0 else 1
        pixels = -(-height // 2**level) * -(-width // 2**level)  # ceil: odd sizes round up when downsampled
        levels.append((width_channels, pixels, attention, heads))
    return levels


def _unet_parameters(unet_config: dict, levels) -> int:
    """Get about how many parameters a U-Net of this config has (3x3 convolutions, time projections, attention)."""
    layers = unet_config.get("layers_per_block") or 1
    temb = 4 * levels[0][0]

    def resnet(c_in, c_out):
        return 9 * c_in * c_out + 9 * c_out * c_out + temb * c_out + (c_in * c_out if c_in != c_out else 0)

    total = 0
    for channels, _, attention, _ in levels:
        per_block = resnet(2 * channels, channels) + (4 * channels * channels if attention else 0)
        total += (2 * layers + 1) * per_block + 9 * channels * channels  # down + up resnets, one resampler
    deepest = levels[-1][0]
    return total + 2 * resnet(deepest, deepest) + 4 * deepest * deepest + temb * temb


def estimate_unet_bytes(unet_config: dict, batch_size: int, training: bool = False) -> int:
    """Get a rough upper bound of the memory one U-Net forward (and backward when training) of a batch needs."""
    levels = _unet_levels(unet_config)
    layers = unet_config.get("layers_per_block") or 1
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError(f"layers_per_block must be a positive integer, got {layers!r}")
    deepest_channels, deepest_pixels, _, deepest_heads = levels[-1]
    mid_attention = unet_config.get("add_attention", True)
    # Score matrices (heads x tokens x tokens per image) and their softmax, for the largest attention block.
    scores = [2 * heads * pixels * pixels for _, pixels, attention, heads in levels if attention]
    if mid_attention:
        scores.append(2 * deepest_heads * deepest_pixels * deepest_pixels)
    largest_scores = max(scores, default=0)
    # Skip connections: the stem's output, each resnet's output and each downsampled map, kept until the up path.
    skips = levels[0][0] * levels[0][1] + sum(layers * channels * pixels + channels * -(-pixels // 4)
                                              for channels, pixels, _, _ in levels)
    largest_map = max(channels * pixels for channels, pixels, _, _ in levels)
    if training:
        saved = 0
        for channels, pixels, attention, heads in levels:
            blocks = 2 * layers + 1  # down resnets, up resnets (one more, for the extra skip)
            saved += blocks * (SAVED_PER_RESNET + 2) * channels * pixels  # up resnets read 2x the channels
            if attention:
                saved += blocks * (SAVED_PER_ATTENTION * channels * pixels + 2 * heads * pixels * pixels)
        saved += 2 * SAVED_PER_RESNET * deepest_channels * deepest_pixels
        per_image = skips + saved + largest_scores
        parameter_copies = TRAINING_PARAMETER_COPIES
    else:
        per_image = skips + LIVE_MAPS * largest_map + largest_scores
        parameter_copies = 1
    return FLOAT_BYTES * (batch_size * per_image + parameter_copies * _unet_parameters(unet_config, levels))


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
