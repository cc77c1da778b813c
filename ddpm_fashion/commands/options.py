"""What the subcommands share: the model options, the output suffixes, and the files no output may replace."""

import argparse
from pathlib import Path
from typing import List, Optional

from ddpm_fashion.checks import seed
from ddpm_fashion.classifier import SHIPPED_WEIGHTS
from ddpm_fashion.ddim import FINAL_TIMESTEP
from ddpm_fashion.run_dir import protected_entries
from ddpm_fashion.saved_pipeline import DEVICE_CHOICES, SCHEDULER_CHOICES

PROG = "ddpm-fashion"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def protected_outputs(model_dir: Optional[str] = None) -> List[Path]:
    """Get the files and folders no output of a command may replace: the model it reads and the shipped weights."""
    return (protected_entries(model_dir) if model_dir else []) + [SHIPPED_WEIGHTS]


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
