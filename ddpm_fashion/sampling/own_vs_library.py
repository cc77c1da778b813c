"""Own vs library: sample with {our U-Net, UNet2DModel} x {our DDPMScheduler, diffusers'} and compare.

All runs start from the same initial noise and draw the same step noise (one generator, re-seeded per run), so an
exact reimplementation gives the same images; the largest difference to the library/library images is the proof.
In those four runs our U-Net is in reference mode (`reference_mode = True`): UNet2DModel's kernels in its memory
layouts, so a difference measures arithmetic, not which kernels ran. A fifth run samples with our stack as `sample`
and `evaluate` do (the fast layout), for its speed: its images also differ by the rounding of other kernels, which
adds up over sampling steps (measured by benchmarks/unet_drift.py; benchmarks/README.md), so it is held to the looser
LAYOUT_TOLERANCE, which still catches any real error. The runs are the sampling benchmark too: U-Net forwards and
scheduler.step() calls are timed apart, so the cost of our step() can be read against one U-Net forward.
"""

import platform
import time
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional

import diffusers
import torch
from tqdm.auto import tqdm

from ddpm_fashion.guards.inputs import MAX_SEED, check_int
from ddpm_fashion.sampling.generate import (
    StepTimings,
    check_num_inference_steps,
    check_sampling_memory,
    denoise,
    initial_noise,
)
from ddpm_fashion.sampling.pictures import image_grid, side_by_side, to_unit_range, with_caption
from ddpm_fashion.sampling.saved_pipeline import load_pipeline, resolve_device

# fp32 sampling with identical seeds must agree to this (max |difference| in model space, [-1, 1]).
MAX_ABS_DIFF_TOLERANCE = 1e-5
# Our fast stack against the library's: kernel rounding stays orders of magnitude below what a mistake in the
# network moves images by (benchmarks/README.md has the measured drift).
LAYOUT_TOLERANCE = 1e-3


class Run(NamedTuple):
    """One sampling run of the comparison: which U-Net and scheduler code, our U-Net's mode, and its tolerance."""

    unet: str
    scheduler: str
    mode: str  # "reference": our U-Net with UNet2DModel's kernels and layouts; "fast": as it samples by default
    tolerance: float


# The first run is the reference every run is measured against.
RUNS = (
    Run("diffusers", "diffusers", "reference", MAX_ABS_DIFF_TOLERANCE),
    Run("diffusers", "own", "reference", MAX_ABS_DIFF_TOLERANCE),
    Run("own", "diffusers", "reference", MAX_ABS_DIFF_TOLERANCE),
    Run("own", "own", "reference", MAX_ABS_DIFF_TOLERANCE),
    Run("own", "own", "fast", LAYOUT_TOLERANCE),
)
# Float copies of the batch's images that compare keeps at once: one per run, and the side-by-side picture.
IMAGE_COPIES = len(RUNS) + 1


@dataclass
class Comparison:
    """The report (JSON-ready: runs and settings) and the final images of each run."""

    report: dict
    images: Dict[Run, torch.Tensor]


@torch.no_grad()
def _timed_run(pipe, num_images: int, num_inference_steps: int, seed: int, progress: bool, label: str):
    """Sample one batch from a freshly seeded generator; get the final x_0, the timings and the wall time."""
    # One untimed forward first: the first call pays one-off allocation and kernel selection costs.
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = initial_noise(pipe, num_images, generator)
    pipe.unet(noise, torch.tensor(pipe.scheduler.config.num_train_timesteps - 1))
    generator = torch.Generator("cpu").manual_seed(seed)
    timings = StepTimings()
    with tqdm(total=num_inference_steps, desc=label, unit="step", disable=not progress) as bar:
        started = time.perf_counter()
        noise = initial_noise(pipe, num_images, generator)
        sample = denoise(pipe, noise, generator, num_inference_steps, bar, timings=timings)
        seconds = time.perf_counter() - started
    return sample.float().cpu(), timings, seconds


def run_comparison(
    model_dir: str,
    num_inference_steps: Optional[int] = None,
    num_images: int = 64,
    seed: int = 0,
    device="auto",
    progress: bool = True,
) -> Comparison:
    """Sample the four {own, diffusers} U-Net x scheduler combinations (and our fast stack) from the same noise;
    time and compare them."""
    check_int("num_images", num_images)
    check_int("seed", seed, 0, MAX_SEED)
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    reference_pipe = load_pipeline(model_dir, scheduler=RUNS[0].scheduler, unet=RUNS[0].unet, device=device)
    num_inference_steps = check_num_inference_steps(reference_pipe, num_inference_steps)
    check_sampling_memory(reference_pipe, num_images, num_images, "--num_images", "--num_images", IMAGE_COPIES)
    pipes = [reference_pipe] + [load_pipeline(model_dir, scheduler=run.scheduler, unet=run.unet, device=device)
                                for run in RUNS[1:]]
    for run, pipe in zip(RUNS, pipes):
        if run.unet == "own":
            pipe.unet.reference_mode = run.mode == "reference"

    runs: List[dict] = []
    images = {}
    reference = None
    for run, pipe in zip(RUNS, pipes):
        label = f"unet={run_label(run.unet, run.mode)} scheduler={run.scheduler}"
        sample, timings, seconds = _timed_run(pipe, num_images, num_inference_steps, seed, progress, label)
        reference = sample if reference is None else reference
        images[run] = to_unit_range(sample)
        runs.append({
            "unet": run.unet,
            "scheduler": run.scheduler,
            "mode": run.mode,
            "max_abs_diff": (sample - reference).abs().max().item(),
            "tolerance": run.tolerance,
            "sec_per_step": seconds / num_inference_steps,
            "images_per_s": num_images / seconds,
            "unet_forward_ms": 1000 * timings.unet_s / timings.steps,
            "scheduler_step_ms": 1000 * timings.scheduler_s / timings.steps,
            "step_to_forward_ratio": timings.scheduler_s / timings.unet_s,
        })
    settings = {
        "model": str(model_dir),
        "num_inference_steps": num_inference_steps,
        "num_images": num_images,
        "batch_size": num_images,
        "seed": seed,
        "device": str(device),
        "dtype": str(reference_pipe.unet.dtype).replace("torch.", ""),
        "modes": "reference: our U-Net with UNet2DModel's kernels and memory layouts (reference_mode=True); "
                 "fast: our U-Net as it samples by default",
        "max_abs_diff_tolerance": MAX_ABS_DIFF_TOLERANCE,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        settings["gpu"] = torch.cuda.get_device_name(device)
    return Comparison(report={"runs": runs, "settings": settings}, images=images)


def run_label(unet: str, mode: str) -> str:
    """Get how a run's U-Net is named in tables: the fast mode of ours is named, reference mode is the default."""
    return f"{unet} (fast)" if mode == "fast" else unet


def mismatched_runs(report: dict) -> List[dict]:
    """Get the runs whose images differ from the library/library images by more than their tolerance."""
    return [run for run in report["runs"] if not run["max_abs_diff"] <= run["tolerance"]]  # NaN fails too


def format_table(report: dict) -> str:
    """Get the report's runs as an aligned text table, one row per (unet, scheduler) run."""
    header = ("unet", "scheduler", "max |Δ|", "allowed", "s/step", "images/s", "unet ms/step", "step() ms",
              "step/unet")
    rows = [header]
    for run in report["runs"]:
        rows.append((
            run_label(run["unet"], run["mode"]),
            run["scheduler"],
            f"{run['max_abs_diff']:.3g}",
            f"{run['tolerance']:g}",
            f"{run['sec_per_step']:.4g}",
            f"{run['images_per_s']:.4g}",
            f"{run['unet_forward_ms']:.4g}",
            f"{run['scheduler_step_ms']:.4g}",
            f"{100 * run['step_to_forward_ratio']:.2f}%",
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    settings = report["settings"]
    lines.append(
        f"{settings['num_images']} images, {settings['num_inference_steps']} steps, seed {settings['seed']}, "
        f"{settings['device']} {settings['dtype']}; max |Δ| is against unet=diffusers scheduler=diffusers"
    )
    return "\n".join(lines)


def comparison_picture(comparison: Comparison):
    """Get the runs' image grids side by side, each captioned with its U-Net and scheduler."""
    grids = [
        with_caption(image_grid(images), f"unet={run_label(run.unet, run.mode)} sched={run.scheduler}")
        for run, images in comparison.images.items()
    ]
    return side_by_side(grids, gap=16)
