"""What is published beside a trained pipeline: the model card (diffusers' convention) and the loss curve."""

from pathlib import Path
from typing import Optional

import numpy as np

# A Figure made directly (not through pyplot) draws with a file-only canvas: no GUI backend is chosen or needed, so
# the trainer runs on machines with no screen, and no global matplotlib setting changes.
from matplotlib.figure import Figure

CARD_TEMPLATE = """---
library_name: diffusers
license: apache-2.0
tags:
- pytorch
- diffusers
- unconditional-image-generation
- diffusion-models-class
- ddpm
{data_metadata}---

# DDPM trained on {data_name}

An unconditional DDPM (Ho et al. 2020) trained on {data_description} with
ddpm_fashion's `train_accelerate.py`. The folder is a standard diffusers `DDPMPipeline`.

![samples](samples.png)

## How to load

```python
from diffusers import DDPMPipeline

pipe = DDPMPipeline.from_pretrained("{output_dir}")
image = pipe(num_inference_steps={inference_steps}).images[0]
```

## Training

| | |
|---|---|
| optimizer steps | {steps} |
| images seen | {images_seen} |
| final loss (mean of last 100 steps) | {final_loss:.5f} |
| training time | {training_time} |
| processes × batch | {world_size} × {batch_size} |
| EMA weights | {use_ema} |

![loss](loss.png)

Resolved training config:

```yaml
{config_yaml}```
"""


def describe_training_time(train_seconds: Optional[float], session_seconds: float) -> str:
    """Get the model card's training time: over every session of a resumed run, and the last session's share."""
    if train_seconds is None:  # resumed from a checkpoint written before checkpoints recorded it
        return f"{session_seconds:.0f} s in the last session (earlier sessions did not record theirs)"
    if train_seconds > session_seconds:  # earlier sessions took time
        return f"{train_seconds:.0f} s over all sessions ({session_seconds:.0f} s in the last)"
    return f"{train_seconds:.0f} s"


def describe_data(config) -> dict:
    """Get the model card's words for the training data: its name, a description with the image shape, the metadata."""
    size, channels = config.unet["sample_size"], config.unet["in_channels"]
    shape = f"{size}×{size} {'grey' if channels == 1 else 'RGB' if channels == 3 else f'{channels}-channel'}"
    if config.train_data_dir:
        name = Path(config.train_data_dir).name
        return {"data_name": name, "data_description": f"the image folder `{name}` (resized to {shape})",
                "data_metadata": ""}
    if config.dataset_name:
        name = config.dataset_name
        on_hub = not Path(name).exists()  # a save_to_disk folder is no Hub dataset to link
        return {"data_name": Path(name).name if not on_hub else name,
                "data_description": f"the `datasets` dataset `{name}` (resized to {shape})",
                "data_metadata": f"datasets:\n- {name}\n" if on_hub else ""}
    return {"data_name": "FashionMNIST", "data_description": "FashionMNIST (28×28 grey, padded to 32×32)",
            "data_metadata": "- fashion-mnist\ndatasets:\n- zalando-datasets/fashion_mnist\n"}


def write_model_card(path: Path, *, config, config_yaml: str, steps: int, images_seen: int, losses: list,
                     train_seconds: Optional[float], session_seconds: float, world_size: int) -> None:
    """Write the model card README.md of a published pipeline."""
    final_loss = float(np.mean(losses[-100:])) if losses else float("nan")
    Path(path).write_text(CARD_TEMPLATE.format(
        output_dir=config.output_dir, inference_steps=config.ddpm_num_inference_steps, steps=steps,
        images_seen=images_seen, final_loss=final_loss, world_size=world_size,
        training_time=describe_training_time(train_seconds, session_seconds),
        batch_size=config.train_batch_size, use_ema=config.use_ema, config_yaml=config_yaml, **describe_data(config)))


def plot_loss(path: Path, losses: list) -> None:
    """Plot the per-step training loss and its running mean."""
    figure = Figure(figsize=(6, 3.5), dpi=120)
    axis = figure.subplots()
    steps = np.arange(1, len(losses) + 1)
    axis.plot(steps, losses, lw=0.5, alpha=0.35, label="per step")
    if len(losses) >= 20:
        window = max(10, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    axis.set_yscale("log")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("MSE loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
