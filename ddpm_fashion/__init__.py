"""ddpm_fashion: a readable DDPM for FashionMNIST with its own scheduler and U-Net, proven equal to diffusers'."""

from .scheduler import DDPMScheduler, DDPMSchedulerOutput

__version__ = "0.1.0"
__all__ = ["DDPMScheduler", "DDPMSchedulerOutput"]
