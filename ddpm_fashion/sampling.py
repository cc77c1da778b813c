"""Sampling from a saved DDPMPipeline: load it with a chosen scheduler and U-Net, generate in batches, film it.

The loop below is DDPMPipeline.__call__ (Algorithm 2 of Ho et al. 2020) written out, so that it can show one
progress bar over many batches, time the U-Net apart from the scheduler, and hand every step to a recorder for the
reverse-process GIF. With one batch it returns exactly what `pipe(batch_size=N, generator=..., output_type="pt")`
returns (tests/test_cli.py checks this bit for bit).
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel
from diffusers import DDPMScheduler as LibraryDDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ddpm_fashion.scheduler import DDPMScheduler

SCHEDULER_CHOICES = ("own", "diffusers", "ddim", "dpm")
UNET_CHOICES = ("own", "diffusers")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# Fast samplers need far fewer steps than the 1000 training steps DDPM walks through; these are their usual counts.
DEFAULT_INFERENCE_STEPS = {"ddim": 50, "dpm": 25}
# Enough frames to watch the noise turn into clothes. Noisy frames barely compress: 16 images x 41 frames at 3x
# scale made a 5.4 MB GIF, at 2x 3.4 MB.
MAX_GIF_FRAMES = 40
MAX_GIF_IMAGES = 16
GIF_FRAME_MS = 80
GIF_LAST_FRAME_MS = 2000
# Images are 28-32 px: scale them up so a GIF frame is readable on screen.
GIF_UPSCALE = 2


def _require_choice(name: str, value, choices) -> None:
    """Raise a one-line ValueError naming the valid choices when value is not one of them."""
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not supported; choose one of: {', '.join(choices)}")


def resolve_device(device: str = "auto") -> torch.device:
    """Get the torch device for a --device choice: 'auto' is CUDA when present, else the CPU."""
    _require_choice("device", device, DEVICE_CHOICES)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(device)


def check_pipeline_dir(model_dir: str) -> Path:
    """Get model_dir as a Path, or raise a one-line error unless it is a saved DDPMPipeline folder."""
    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    index_file = path / "model_index.json"
    if not path.is_dir() or not index_file.is_file():
        raise ValueError(f"{model_dir} is not a saved DDPMPipeline: it has no model_index.json")
    try:
        class_name = json.loads(index_file.read_text()).get("_class_name")
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"{model_dir} is not a saved DDPMPipeline: model_index.json is not a JSON object") from None
    if class_name != "DDPMPipeline":
        raise ValueError(f"{model_dir} holds a {class_name}, not a DDPMPipeline")
    # Weights are read from safetensors only: a pickled .bin is never unpickled here.
    for required in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        if not (path / required).is_file():
            raise ValueError(f"{model_dir} is not a complete DDPMPipeline: {required} is missing")
    return path


def build_scheduler(name: str, config) -> object:
    """Get the scheduler called `name` (one of SCHEDULER_CHOICES) built from a DDPM scheduler config."""
    _require_choice("scheduler", name, SCHEDULER_CHOICES)
    if name == "own":
        return DDPMScheduler.from_config(config)
    if name == "diffusers":
        return LibraryDDPMScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    # DPM-Solver++ (the data-prediction form) is the variant recommended for sampling from a trained DDPM.
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


def _load_unet(path: Path, name: str):
    """Get the U-Net of a pipeline folder as our UNet ('own') or diffusers' UNet2DModel, from the same weights."""
    if name == "own":
        from ddpm_fashion.unet import UNet

        return UNet.from_pretrained(path, subfolder="unet")
    return UNet2DModel.from_pretrained(path, subfolder="unet", local_files_only=True, use_safetensors=True)


def load_pipeline(model_dir: str, scheduler: str = "own", unet: str = "diffusers", device="auto") -> DDPMPipeline:
    """Load a saved DDPMPipeline from a local folder with the chosen scheduler and U-Net, on the chosen device."""
    _require_choice("scheduler", scheduler, SCHEDULER_CHOICES)
    _require_choice("unet", unet, UNET_CHOICES)
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    path = check_pipeline_dir(model_dir)
    # Components are loaded one by one rather than via DDPMPipeline.from_pretrained, which would import whatever
    # library model_index.json names; here only the two known classes are ever built.
    try:
        scheduler_config = LibraryDDPMScheduler.load_config(path, subfolder="scheduler", local_files_only=True)
        noise_scheduler = build_scheduler(scheduler, scheduler_config)
        model = _load_unet(path, unet)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        message = " ".join(str(error).split())  # library messages span lines; the CLI prints one
        raise ValueError(f"{model_dir} is not a loadable DDPMPipeline: {message}") from None
    model.eval()
    pipe = DDPMPipeline(unet=model, scheduler=noise_scheduler)
    return pipe.to(device)


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


def _check_positive(name: str, value) -> None:
    """Raise a one-line ValueError unless value is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
    return sample


def initial_noise(pipe: DDPMPipeline, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Get x_T ~ N(0, I) for a batch, drawn exactly as DDPMPipeline draws it."""
    size = pipe.unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (batch_size, pipe.unet.config.in_channels, *size)
    return randn_tensor(shape, generator=generator, device=pipe.device, dtype=pipe.unet.dtype)


def to_unit_range(sample: torch.Tensor) -> torch.Tensor:
    """Get model-space images in [-1, 1] as float images in [0, 1] on the CPU."""
    return (sample / 2 + 0.5).clamp(0, 1).float().cpu()


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
    _check_positive("num_images", num_images)
    _check_positive("batch_size", batch_size)
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
    total_steps = (start // batch_size + len(batch_sizes)) * num_inference_steps
    with tqdm(total=total_steps, initial=start // batch_size * num_inference_steps, desc="sampling", unit="step",
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


def image_grid(images: torch.Tensor, nrow: Optional[int] = None) -> Image.Image:
    """Get float images [N, C, H, W] in [0, 1] as one near-square grid picture, separated by white lines."""
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)  # (3, H', W') even for one channel
    return to_pil_image(grid)


def with_caption(image: Image.Image, caption: str) -> Image.Image:
    """Get the image with a one-line caption in a white strip above it (widened when the caption is longer)."""
    strip_height = 14
    text_width = math.ceil(ImageDraw.Draw(image).textlength(caption)) + 4
    captioned = Image.new("RGB", (max(image.width, text_width), image.height + strip_height), "white")
    captioned.paste(image.convert("RGB"), (0, strip_height))
    ImageDraw.Draw(captioned).text((2, 1), caption, fill="black")
    return captioned


def side_by_side(images: List[Image.Image], gap: int = 8) -> Image.Image:
    """Get pictures placed left to right on a white background, top-aligned."""
    width = sum(image.width for image in images) + gap * (len(images) - 1)
    combined = Image.new("RGB", (width, max(image.height for image in images)), "white")
    left = 0
    for image in images:
        combined.paste(image, (left, 0))
        left += image.width + gap
    return combined


def gif_frame_steps(num_inference_steps: int, max_frames: int = MAX_GIF_FRAMES) -> List[int]:
    """Get the step indices to film: evenly spread, always the first and the last step."""
    count = min(num_inference_steps, max_frames)
    if count == 1:
        return [0]
    return sorted({round(i * (num_inference_steps - 1) / (count - 1)) for i in range(count)})


class ReverseProcessRecorder:
    """An on_step callback that keeps x_t and the predicted x_0 of the first batch at a few dozen steps."""

    def __init__(self, scheduler, num_inference_steps: int, max_images: int = MAX_GIF_IMAGES):
        self.scheduler = scheduler
        self.max_images = max_images
        self.frame_steps = set(gif_frame_steps(num_inference_steps))
        self.frames: List[Tuple[int, torch.Tensor, torch.Tensor]] = []  # (timestep, x_t, predicted x_0)

    def __call__(self, batch_index, step_index, timestep, sample, model_output) -> None:
        if batch_index != 0 or step_index not in self.frame_steps:
            return
        keep = slice(0, self.max_images)
        x0 = predicted_original(self.scheduler, model_output[keep], timestep, sample[keep])
        self.frames.append((int(timestep), to_unit_range(sample[keep]), to_unit_range(x0.clamp(-1, 1))))

    def pictures(self, final_images: torch.Tensor) -> List[Image.Image]:
        """Get the GIF frames: x_t beside the predicted x_0 at each filmed step, then the finished samples."""
        final_images = final_images[: self.max_images]
        shots = self.frames + [(None, final_images, final_images)]
        pictures = []
        for timestep, noisy, predicted in shots:
            left = "sample x_0" if timestep is None else f"x_t, t = {timestep}"
            right = "sample x_0" if timestep is None else "predicted x_0"
            panels = [with_caption(_upscaled(noisy), left), with_caption(_upscaled(predicted), right)]
            pictures.append(side_by_side(panels))
        return pictures


def _upscaled(images: torch.Tensor) -> Image.Image:
    """Get a grid picture of small images, enlarged with crisp pixels."""
    grid = image_grid(images)
    return grid.resize((grid.width * GIF_UPSCALE, grid.height * GIF_UPSCALE), Image.NEAREST)


def save_gif(pictures: List[Image.Image], path) -> None:
    """Write pictures as a looping animated GIF that rests on its last frame."""
    durations = [GIF_FRAME_MS] * (len(pictures) - 1) + [GIF_LAST_FRAME_MS]
    first, *rest = pictures
    first.save(path, format="GIF", save_all=True, append_images=rest, duration=durations, loop=0)
