"""Time one DDPMScheduler.step(): ours against diffusers', and against one U-Net forward, in the same run.

    python benchmarks/scheduler_speed.py [--batch_size 64] [--rounds 7] [--steps_per_round 100]

The U-Net is diffusers' UNet2DModel with the architecture of configs/cpu.yaml (the model a CPU trains), so the
last line says what share of a sampling step the scheduler costs. Rounds alternate ours and diffusers' so that
load from other processes hits both alike; medians over rounds are reported.
"""

import argparse
import statistics
import time
from pathlib import Path

import diffusers
import torch
import yaml

from ddpm_fashion.schedulers.ddpm import DDPMScheduler

CPU_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cpu.yaml"


def seconds_per_step(scheduler, model_output, sample, timesteps, generator) -> float:
    """Get the mean wall time of scheduler.step over the given timesteps (0-d tensors, as pipelines pass them)."""
    start = time.perf_counter()
    for t in timesteps:
        scheduler.step(model_output, t, sample, generator=generator)
    return (time.perf_counter() - start) / len(timesteps)


def seconds_per_forward(unet, sample, repeats: int) -> float:
    """Get the mean wall time of one U-Net forward pass without gradients."""
    timestep = torch.tensor(500)
    with torch.no_grad():
        unet(sample, timestep)  # warm-up: first call allocates
        start = time.perf_counter()
        for _ in range(repeats):
            unet(sample, timestep)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    """Print seconds per step() for both schedulers, their ratio, and step() as a share of a U-Net forward."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps_per_round", "--steps-per-round", type=int, default=100)
    parser.add_argument("--unet_repeats", "--unet-repeats", type=int, default=5)
    args = parser.parse_args()

    shape = (args.batch_size, 1, 32, 32)
    sample, model_output = torch.randn(shape), torch.randn(shape)
    schedulers = {"ours": DDPMScheduler(), "diffusers": diffusers.DDPMScheduler()}
    for scheduler in schedulers.values():
        scheduler.set_timesteps(1000)  # as DDPMPipeline does: every lookup goes through the inference schedule
    # Timesteps from across the schedule, none of them 0, so every step draws noise.
    timesteps = list(schedulers["ours"].timesteps[: args.steps_per_round])
    times = {name: [] for name in schedulers}
    for _ in range(args.rounds):
        for name, scheduler in schedulers.items():
            generator = torch.Generator().manual_seed(0)
            times[name].append(seconds_per_step(scheduler, model_output, sample, timesteps, generator))
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["diffusers"])

    unet_config = yaml.safe_load(CPU_CONFIG.read_text())["unet"]
    unet = diffusers.UNet2DModel(**unet_config).eval()
    forward = seconds_per_forward(unet, sample, args.unet_repeats)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} x 1 x 32 x 32, fp32")
    print(f"step() ours:       {ours * 1e3:8.3f} ms")
    print(f"step() diffusers:  {theirs * 1e3:8.3f} ms")
    print(f"ratio ours/diffusers: {ours / theirs:.2f}")
    print(f"U-Net forward (configs/cpu.yaml): {forward * 1e3:8.1f} ms; ours step() = {100 * ours / forward:.2f}% of it")


if __name__ == "__main__":
    main()
