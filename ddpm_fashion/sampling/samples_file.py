"""The resumable samples file of `ddpm-fashion evaluate --samples_file`: a long sampling run survives being stopped.

DDPM's 1000 steps on a CPU take hours. After every batch the images so far and the random generator's state after
them are saved (safetensors, renamed into place whole), with the settings that made them; rerunning the same
command continues from there with results identical to an uninterrupted run. A file made with other settings, or
that is not such a file, is refused and never overwritten.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ddpm_fashion.guards.files import atomic_output, sha256_of_file
from ddpm_fashion.guards.inputs import one_line

SAMPLES_FORMAT = "ddpm_fashion evaluate samples v1"
# What every part of a pipeline folder that makes the images is called; a trainer's checkpoints/ and logs/ are not.
MODEL_ENTRIES = ("unet", "scheduler", "model_index.json")


def pipeline_fingerprint(model_dir) -> str:
    """Get the SHA-256 of a saved pipeline's files, so saved samples are only ever continued with the same model."""
    digest = hashlib.sha256()
    folder = Path(model_dir)
    for path in sorted(file for file in folder.rglob("*") if file.is_file() and not file.name.startswith(".")):
        if path.relative_to(folder).parts[0] not in MODEL_ENTRIES:
            continue
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + sha256_of_file(path).encode())
    return digest.hexdigest()


def _check_saved_tensors(images: torch.Tensor, generator_state: torch.Tensor, image_shape: Tuple[int, ...]) -> None:
    """Raise a ValueError saying what is wrong unless the saved tensors are images and a CPU generator's state."""
    expected_state = torch.Generator("cpu").get_state()
    if generator_state.dtype != expected_state.dtype or generator_state.shape != expected_state.shape:
        raise ValueError(f"its generator_state is {generator_state.dtype} {list(generator_state.shape)}, a CPU "
                         f"generator's state is {expected_state.dtype} {list(expected_state.shape)}")
    if images.dtype != torch.float32:
        raise ValueError(f"its images are {images.dtype}, generated images are float32")
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"its images have shape {list(images.shape)}, this model makes [N, "
                         f"{', '.join(map(str, image_shape))}]")
    if images.numel() and not (images.isfinite().all() and images.min() >= 0 and images.max() <= 1):
        raise ValueError("its images hold values outside [0, 1] or NaN")


def load_samples(path: Path, settings: dict, num_samples: int, batch_size: int,
                 image_shape: Tuple[int, ...]) -> Optional[dict]:
    """Get the images, generator state and timing saved by an earlier run of these settings (None if no file)."""
    if not path.exists():
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != SAMPLES_FORMAT:
                raise ValueError("no samples metadata")
            saved = {"images": handle.get_tensor("images"), "generator_state": handle.get_tensor("generator_state"),
                     "settings": json.loads(metadata["settings"]), "seconds": float(metadata["sampling_seconds"]),
                     "machine": metadata["machine"]}
        _check_saved_tensors(saved["images"], saved["generator_state"], image_shape)
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise ValueError(f"--samples_file {path} is not a samples file of `ddpm-fashion evaluate` ({one_line(error)}); "
                         f"give another path (an existing file is never overwritten)") from None
    for key, value in settings.items():
        if saved["settings"].get(key) != value:
            raise ValueError(f"--samples_file {path} holds samples made with {key} {saved['settings'].get(key)!r}, "
                             f"this run has {value!r}; give another path or the same settings")
    finished = len(saved["images"])
    # An uninterrupted run's first k images equal a k-image run's when k is whole batches; nothing else is reusable.
    if num_samples < finished and num_samples % batch_size:
        raise ValueError(f"--samples_file {path} holds {finished} images; --num_samples {num_samples} can only reuse "
                         f"them as a multiple of --batch_size {batch_size} (or all {finished})")
    if num_samples > finished and finished % batch_size:
        raise ValueError(f"--samples_file {path} holds a finished run of {finished} images; --num_samples must be at "
                         f"most {finished}, or give another path")
    return saved


def save_samples(path: Path, images: torch.Tensor, generator: torch.Generator, settings: dict, seconds: float,
                 machine: str) -> None:
    """Save generated images and the generator state after them, atomically, for `load_samples` to continue from."""
    metadata = {"format": SAMPLES_FORMAT, "settings": json.dumps(settings, sort_keys=True),
                "sampling_seconds": repr(seconds), "machine": machine}
    with atomic_output(path) as staging:
        save_file({"images": images.contiguous(), "generator_state": generator.get_state()}, staging,
                  metadata=metadata)


class SamplesFile:
    """A --samples_file: what an earlier run of the same settings saved, and a save after every batch (on_batch)."""

    def __init__(self, path: Path, settings: dict, num_samples: int, batch_size: int, machine: str,
                 image_shape: Tuple[int, ...]):
        self.path, self.settings = path, settings
        self.saved = load_samples(path, settings, num_samples, batch_size, image_shape)
        self.seconds_before = self.saved["seconds"] if self.saved is not None else 0.0
        previous = self.saved["machine"] if self.saved is not None else machine
        self.machine = previous if previous == machine else f"{previous} + {machine}"
        self.start_clock()

    def start_clock(self) -> float:
        """Start timing this run's sampling (not its set-up) and return the start time."""
        self.started = time.perf_counter()
        return self.started

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> None:
        seconds = self.seconds_before + time.perf_counter() - self.started
        save_samples(self.path, images, generator, self.settings, seconds, self.machine)
