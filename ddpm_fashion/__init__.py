"""ddpm_fashion: a readable DDPM for FashionMNIST with its own scheduler and U-Net, proven equal to diffusers'."""

from .data import (
    CLASS_NAMES,
    ShardedBatchSampler,
    crop_to_28,
    fashion_mnist_dataset,
    load_fashion_mnist,
    to_model_input,
)
from .models.unet import UNet
from .schedulers.ddim import EndingDDIMScheduler
from .schedulers.ddpm import DDPMScheduler, DDPMSchedulerOutput

__version__ = "0.1.0"
__all__ = [
    "CLASS_NAMES",
    "DDPMScheduler",
    "DDPMSchedulerOutput",
    "EndingDDIMScheduler",
    "ShardedBatchSampler",
    "UNet",
    "crop_to_28",
    "fashion_mnist_dataset",
    "load_fashion_mnist",
    "to_model_input",
]
