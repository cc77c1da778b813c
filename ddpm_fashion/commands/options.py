"""What the subcommands share: the model options, the output suffixes, and the rules for every output.

An output is checked before any work: it must be new (an existing file is never replaced), lie outside the shipped
weights and outside the entries of every pipeline, run or checkpoint folder above it (a new file beside a model is
fine), and fit its disk where its size is known. It is written whole under a temporary name and renamed into place;
a failed write is one line naming the path.
"""

import argparse
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

from ddpm_fashion.evaluation.classifier import SHIPPED_WEIGHTS
from ddpm_fashion.guards.files import atomic_output, check_output_path, free_bytes, is_disk_full
from ddpm_fashion.guards.inputs import one_line, seed
from ddpm_fashion.sampling.saved_pipeline import DEVICE_CHOICES, SCHEDULER_CHOICES
from ddpm_fashion.schedulers.ddim import FINAL_TIMESTEP
from ddpm_fashion.training.resources import format_bytes
from ddpm_fashion.training.run_dir import protected_entries

PROG = "ddpm-fashion"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def protected_outputs(model_dir: Optional[str] = None) -> List[Path]:
    """Get the files and folders no output of a command may replace: the model it reads and the shipped weights."""
    return (protected_entries(model_dir) if model_dir else []) + [SHIPPED_WEIGHTS]


def model_folder_entries(folder: Path) -> List[Path]:
    """Get what no output may replace in a folder above it: a pipeline's, run's or checkpoint's own entries."""
    return protected_entries(folder, only_if_model=True)


def check_new_output(path: str, suffixes: Iterable[str], model_dir: Optional[str] = None) -> Path:
    """Get a command's output path, or raise a one-line ValueError before any work unless it is new, outside every
    model folder's own entries (the model read included) and the shipped weights, and writable."""
    return check_output_path(path, suffixes, protected_outputs(model_dir), model_folder_entries, new=True)


def write_error(path: Path, error: BaseException, what: str = "output") -> str:
    """Get the one-line report of a failed write, naming the path (and what to do when the disk is full)."""
    if is_disk_full(error):  # safetensors' writer says it in a Rust debug string
        return f"cannot write {what} {path}: no space left on its disk; free space or give a path on another disk"
    return f"cannot write {what} {path}: {getattr(error, 'strerror', None) or one_line(error)}"


@contextmanager
def writing(path: Path, what: str = "output") -> Iterator[Path]:
    """atomic_output(path), refusing a path that appeared since it was checked, with errors naming the path."""
    if os.path.lexists(path):
        raise ValueError(f"{what} {path} appeared while this command ran; it is left as it is, give a new name")
    try:
        with atomic_output(path) as staging:
            yield staging
    except OSError as error:
        raise ValueError(write_error(path, error, what)) from None


def check_free_space(needed: Iterable[Tuple[Path, int]]) -> None:
    """Raise a one-line ValueError before any work if the outputs' disks lack the space they need.

    `needed` pairs each output with an upper bound of its size; outputs on one disk add up.
    """
    by_disk = {}
    for path, size in needed:
        folder = Path(os.path.abspath(path)).parent
        device = folder.stat().st_dev
        paths, total = by_disk.get(device, ([], 0))
        by_disk[device] = (paths + [path], total + size)
    for paths, total in by_disk.values():
        free = free_bytes(Path(os.path.abspath(paths[0])).parent)
        if free < total:
            raise ValueError(f"output {' and '.join(map(str, paths))} needs up to {format_bytes(total)}, but its disk "
                             f"has {format_bytes(free)} free; free space or give a path on another disk")


def add_seed_option(parser: argparse.ArgumentParser, help: str) -> None:
    """Add --seed, an integer in the range every seed of ddpm_fashion takes."""
    parser.add_argument("--seed", type=seed, default=0, help=help)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """Add --device (auto, cpu or cuda)."""
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto picks CUDA when present")


def add_scheduler_option(parser: argparse.ArgumentParser) -> None:
    """Add --scheduler, the sampler built from the saved DDPM scheduler config (default: our DDPM)."""
    parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default="own",
                        help="own/diffusers: DDPM; ddim, dpm (DPM-Solver++): fast samplers from the same config "
                             f"(ddim never clips x_0 and ends at t = {FINAL_TIMESTEP} with its x_0 estimate, above "
                             "the noise levels the U-Net denoises worst; ddim-to-t0 walks down to t = 0; "
                             "ddim-from-config is DDIMScheduler.from_config, clip_sample included)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add the options every sampling subcommand shares."""
    parser.add_argument("--model", required=True, help="folder of a saved DDPMPipeline (e.g. the trainer's output_dir)")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="sampling steps, 1..training steps (default: all training steps for DDPM, 50 for "
                             "ddim, 25 for dpm)")
    add_seed_option(parser, "seed of the CPU generator (same images on CPU and GPU)")
    add_device_option(parser)
