"""Sampling from a loaded DDPMPipeline: the reverse process, batch by batch, with its inputs checked up front.

The loop below is DDPMPipeline.__call__ (Algorithm 2 of Ho et al. 2020) written out, so that it can show one
progress bar over many batches, time the U-Net apart from the scheduler, and hand every step to a recorder for the
reverse-process GIF. With one batch it returns exactly what `pipe(batch_size=N, generator=..., output_type="pt")`
returns (tests/test_cli.py checks this bit for bit).
"""

import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from diffusers import DDPMPipeline
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ddpm_fashion.guards.inputs import MAX_SEED, check_int
from ddpm_fashion.sampling.pictures import to_unit_range
from ddpm_fashion.sampling.saved_pipeline import UNET_CONFIG
from ddpm_fashion.training.resources import available_memory, check_memory, format_bytes, measure_unet_bytes

# Fast samplers need far fewer steps than the 1000 training steps DDPM walks through; these are their usual counts.
DEFAULT_INFERENCE_STEPS = {"ddim": 50, "ddim-to-t0": 50, "ddim-from-config": 50, "dpm": 25}


def check_num_inference_steps(pipe: DDPMPipeline, num_inference_steps: Optional[int]) -> int:
    """Get the number of sampling steps (None means every training timestep), or raise a one-line ValueError."""
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    if num_inference_steps is None:
        return num_train_timesteps
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and the {num_train_timesteps} training timesteps, "
            f"got {num_inference_steps}"
        )
    return num_inference_steps


def inference_steps(pipe: DDPMPipeline, scheduler: str, num_inference_steps: Optional[int]) -> int:
    """Get the sampling steps of a run: the given number, else the scheduler's usual count (DDPM: every timestep)."""
    if num_inference_steps is None:
        num_inference_steps = DEFAULT_INFERENCE_STEPS.get(scheduler)  # None: every training timestep
    return check_num_inference_steps(pipe, num_inference_steps)


def sample_shape(pipe: DDPMPipeline) -> Tuple[int, int, int]:
    """Get the (channels, height, width) of one image the pipeline's U-Net makes."""
    size = pipe.unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (pipe.unet.config.in_channels, *size)


def check_sampling_memory(pipe: DDPMPipeline, batch_size: int, num_images: int, batch_option: str,
                          images_option: str, copies_kept: int = 1) -> None:
    """Raise a one-line ValueError before sampling when a batch, or the finished images, cannot fit in memory.

    `copies_kept` counts the float copies of all images a command holds at once (e.g. the images and their grid).
    """
    one_image = measure_unet_bytes(pipe.unet, 1)
    available = available_memory(pipe.device)
    if available is not None and one_image > available:
        raise ValueError(f"one image of this model (sample_size {pipe.unet.config.sample_size!r} in {UNET_CONFIG}) "
                         f"needs about {format_bytes(one_image)} of memory, more than {pipe.device.type} has free")
    check_memory(measure_unet_bytes(pipe.unet, batch_size), pipe.device, f"a batch of {batch_size} images",
                 batch_option)
    channels, height, width = sample_shape(pipe)
    kept = copies_kept * num_images * channels * height * width * 4  # float32 on the CPU
    check_memory(kept, "cpu", f"keeping {num_images} images", images_option)


def check_finite_sample(sample: torch.Tensor, scheduler, batch_index: int) -> None:
    """Raise a one-line ValueError when a finished batch holds NaN or inf values (rather than save black images)."""
    bad = int((~torch.isfinite(sample)).sum())
    if bad:
        raise ValueError(f"sampling produced {bad:,} NaN or infinite values in batch {batch_index} though the "
                         f"U-Net's weights are finite: check the scheduler config ({type(scheduler).__name__}, "
                         f"beta_schedule {scheduler.config.get('beta_schedule')!r}) and the U-Net config")


@dataclass
class StepTimings:
    """Wall-clock seconds spent in U-Net forwards and in scheduler.step() over a sampling run."""

    unet_s: float = 0.0
    scheduler_s: float = 0.0
    steps: int = 0


# on_step(batch_index, step_index, timestep, x_t, model_output): called after the U-Net, before scheduler.step.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None]
# on_batch(images_so_far, generator): called after each finished batch, e.g. to save a resumable run.
BatchCallback = Callable[[torch.Tensor, torch.Generator], None]


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer around it measures the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def denoise(
    pipe: DDPMPipeline,
    noise: torch.Tensor,
    generator: torch.Generator,
    num_inference_steps: int,
    progress_bar=None,
    on_step: Optional[StepCallback] = None,
    batch_index: int = 0,
    timings: Optional[StepTimings] = None,
) -> torch.Tensor:
    """Run the reverse process from x_T = noise down to x_0 (Algorithm 2), returning x_0 in about [-1, 1]."""
    unet, scheduler = pipe.unet, pipe.scheduler
    # No device argument, as in DDPMPipeline: timesteps stay on the CPU, so stepping needs no GPU sync.
    scheduler.set_timesteps(num_inference_steps)
    sample = noise
    for step_index, timestep in enumerate(scheduler.timesteps):
        started = time.perf_counter()
        model_output = unet(sample, timestep).sample
        if timings is not None:
            _synchronize(sample.device)
            timings.unet_s += time.perf_counter() - started
        if on_step is not None:
            on_step(batch_index, step_index, timestep, sample, model_output)
        stepping = time.perf_counter()  # after the recorder: its copies are not the scheduler's cost
        sample = scheduler.step(model_output, timestep, sample, generator=generator).prev_sample
        if timings is not None:
            _synchronize(sample.device)
            timings.scheduler_s += time.perf_counter() - stepping
            timings.steps += 1
        if progress_bar is not None:
            progress_bar.update(1)
    check_finite_sample(sample, scheduler, batch_index)
    return sample


def initial_noise(pipe: DDPMPipeline, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Get x_T ~ N(0, I) for a batch, drawn exactly as DDPMPipeline draws it."""
    return randn_tensor((batch_size, *sample_shape(pipe)), generator=generator, device=pipe.device,
                        dtype=pipe.unet.dtype)


def generate_images(
    pipe,
    num_images: int,
    batch_size: int = 64,
    num_inference_steps: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    on_step: Optional[StepCallback] = None,
    resume: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    on_batch: Optional[BatchCallback] = None,
) -> torch.Tensor:
    """Generate num_images images as float [N, C, H, W] in [0, 1] on the CPU, batch by batch (bounded memory).

    `resume = (images, generator_state)` continues a run that stopped after whole batches, as `on_batch` saw it, and
    returns exactly what the uninterrupted run returns; `on_batch(images_so_far, generator)` follows every batch.
    """
    check_int("num_images", num_images)
    check_int("batch_size", batch_size)
    check_int("seed", seed, 0, MAX_SEED)
    num_inference_steps = check_num_inference_steps(pipe, num_inference_steps)
    # One CPU generator for the whole run: the same seed gives the same images on CPU and GPU, and the first batch
    # equals pipe(batch_size=batch_size, generator=torch.Generator().manual_seed(seed)).
    generator = torch.Generator("cpu").manual_seed(seed)
    images = []
    if resume is not None:
        finished, generator_state = resume
        if len(finished) % batch_size or len(finished) > num_images:
            raise ValueError(f"can only resume after whole batches of {batch_size} and at most {num_images} images, "
                             f"got {len(finished)} finished images")
        generator.set_state(generator_state)
        images.append(finished)
    start = sum(len(batch) for batch in images)
    batch_sizes = [min(batch_size, num_images - begin) for begin in range(start, num_images, batch_size)]
    pipe.scheduler.set_timesteps(num_inference_steps)
    walk = len(pipe.scheduler.timesteps)  # U-Net calls per batch: `ddim` ends its walk before the last steps
    total_steps = (start // batch_size + len(batch_sizes)) * walk
    with tqdm(total=total_steps, initial=start // batch_size * walk, desc="sampling", unit="step",
              disable=not progress) as bar:
        for batch_index, size in enumerate(batch_sizes, start=start // batch_size):
            noise = initial_noise(pipe, size, generator)
            sample = denoise(pipe, noise, generator, num_inference_steps, bar, on_step, batch_index)
            images.append(to_unit_range(sample))  # only finished batches are kept, on the CPU
            if on_batch is not None:
                on_batch(torch.cat(images), generator)
    return torch.cat(images)


def predicted_original(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """Get the model's estimate of x_0 from x_t (eq. 15 of Ho et al. solved for x_0), for any of our schedulers."""
    # Not every scheduler's step() returns its x_0 estimate (DPM-Solver's does not), so it is computed here.
    channels = sample.shape[1]
    model_output = model_output[:, :channels]  # learned-variance models append C variance channels
    alpha_bar = scheduler.alphas_cumprod[int(timestep)].to(sample.device, sample.dtype)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * sample - (1 - alpha_bar).sqrt() * model_output
    return (sample - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
