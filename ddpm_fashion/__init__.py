"""ddpm_fashion: a readable DDPM for FashionMNIST with its own scheduler and U-Net, proven equal to diffusers'."""

__version__ = "0.1.0"
