"""Reading a saved DDPMPipeline folder: its files checked one by one, with a chosen scheduler and U-Net.

Components are loaded one by one rather than via DDPMPipeline.from_pretrained, which would import whatever library
model_index.json names; here only the known classes are ever built, weights are read from safetensors only (a
pickled .bin is never unpickled), and every config file is checked to hold a JSON object before a library reads it
(diffusers takes a non-object for a Hub model name and talks about the network).
"""

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel
from diffusers import DDPMScheduler as LibraryDDPMScheduler
from safetensors import SafetensorError

from ddpm_fashion.guards.files import read_json_object
from ddpm_fashion.guards.inputs import one_line, require_choice
from ddpm_fashion.schedulers.ddim import EndingDDIMScheduler
from ddpm_fashion.schedulers.ddpm import DDPMScheduler

SCHEDULER_CHOICES = ("own", "diffusers", "ddim", "ddim-to-t0", "ddim-from-config", "dpm")
UNET_CHOICES = ("own", "diffusers")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
INDEX_FILE = "model_index.json"
UNET_CONFIG = "unet/config.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def resolve_device(device: str = "auto") -> torch.device:
    """Get the torch device for a --device choice: 'auto' is CUDA when present, else the CPU."""
    require_choice("device", device, DEVICE_CHOICES)
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
    if not path.is_dir() or not (path / INDEX_FILE).is_file():
        raise ValueError(f"{model_dir} is not a saved DDPMPipeline: it has no {INDEX_FILE}")
    try:
        class_name = read_json_object(path / INDEX_FILE).get("_class_name")
    except ValueError as error:
        raise ValueError(f"{model_dir} is not a saved DDPMPipeline: {error}") from None
    if class_name != "DDPMPipeline":
        raise ValueError(f"{model_dir} holds a {class_name}, not a DDPMPipeline")
    for required in (UNET_CONFIG, UNET_WEIGHTS, SCHEDULER_CONFIG):
        if not (path / required).is_file():
            raise ValueError(f"{model_dir} is not a complete DDPMPipeline: {required} is missing")
    return path


def read_component_config(model_dir, name: str) -> dict:
    """Get a component's config file (UNET_CONFIG or SCHEDULER_CONFIG) of a pipeline folder as a dict."""
    return read_json_object(Path(model_dir) / name)


def build_scheduler(name: str, config) -> object:
    """Get the scheduler called `name` (one of SCHEDULER_CHOICES) built from a DDPM scheduler config."""
    require_choice("scheduler", name, SCHEDULER_CHOICES)
    if name == "own":
        return DDPMScheduler.from_config(config)
    if name == "diffusers":
        return LibraryDDPMScheduler.from_config(config)
    if name in ("ddim", "ddim-to-t0"):
        # Not DDPM's clip_sample=True, which from_config would inherit: clipping x_0 at every step of a deterministic
        # sampler compounds, and FID then rises with the step count (benchmarks/ddim_steps.py measures it).
        scheduler = EndingDDIMScheduler.from_config(config, clip_sample=False)
        if name == "ddim-to-t0":
            scheduler.final_timestep = 0  # every timestep down to t = 0: diffusers' DDIMScheduler, step for step
        return scheduler
    if name == "ddim-from-config":
        return DDIMScheduler.from_config(config)  # every option the saved config has, clip_sample included
    # DPM-Solver++ (the data-prediction form) is the variant recommended for sampling from a trained DDPM.
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


def sampler_settings(name: str, scheduler) -> dict:
    """Get what makes a sampler's images, beyond its name: a samples file is only continued with the same."""
    if isinstance(scheduler, EndingDDIMScheduler) and scheduler.final_timestep:
        return {"sampler": name, "final_timestep": scheduler.final_timestep}  # `ddim` walked to t = 0 before
    return {"sampler": name}


def _load_unet(path: Path, name: str):
    """Get the U-Net of a pipeline folder as our UNet ('own') or diffusers' UNet2DModel, from the same weights."""
    if name == "own":
        from ddpm_fashion.models.unet import UNet

        return UNet.from_pretrained(path, subfolder="unet")
    return UNet2DModel.from_pretrained(path, subfolder="unet", local_files_only=True, use_safetensors=True)


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Raise a one-line ValueError when any weight of a model is NaN or infinite (it could only sample garbage)."""
    tensors = [*model.parameters(), *model.buffers()]
    bad = sum(int((~torch.isfinite(tensor)).sum()) for tensor in tensors if tensor.is_floating_point())
    if bad:
        total = sum(tensor.numel() for tensor in tensors)
        raise ValueError(f"{where}: the model's weights are not finite ({bad:,} of {total:,} values are NaN or "
                         f"infinite); it cannot sample, retrain it or use an earlier checkpoint")


def load_pipeline(model_dir: str, scheduler: str = "own", unet: str = "diffusers", device="auto") -> DDPMPipeline:
    """Load a saved DDPMPipeline from a local folder with the chosen scheduler and U-Net, on the chosen device."""
    require_choice("scheduler", scheduler, SCHEDULER_CHOICES)
    require_choice("unet", unet, UNET_CHOICES)
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    path = check_pipeline_dir(model_dir)
    scheduler_config = read_component_config(path, SCHEDULER_CONFIG)
    read_component_config(path, UNET_CONFIG)  # a non-object is refused here, naming the file
    try:
        noise_scheduler = build_scheduler(scheduler, scheduler_config)
        model = _load_unet(path, unet)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        raise ValueError(f"{model_dir} is not a loadable DDPMPipeline: {one_line(error)}") from None
    check_finite_weights(model, str(path / UNET_WEIGHTS))
    model.eval()
    pipe = DDPMPipeline(unet=model, scheduler=noise_scheduler)
    return pipe.to(device)
