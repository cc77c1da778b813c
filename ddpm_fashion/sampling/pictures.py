"""Images as pictures: value conversions and the one grid layout every picture of ddpm_fashion uses.

Model space is [-1, 1] (the data's [0, 1] scaled by 2x - 1); pictures are floats in [0, 1] or uint8. A grid is
near-square (ceil(sqrt(n)) images per row) with 2-pixel white lines between the images.
"""

import math
from typing import List, Optional

import torch
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from ddpm_fashion.data import IMAGE_SIZE, MODEL_SIZE, crop_to_28

GRID_PADDING = 2
GRID_PAD_VALUE = 1.0  # white
CAPTION_HEIGHT = 14


def to_unit_range(sample: torch.Tensor) -> torch.Tensor:
    """Get model-space images in [-1, 1] as float images in [0, 1] on the CPU."""
    return (sample / 2 + 0.5).clamp(0, 1).float().cpu()


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """Get uint8 [N, 1, 28, 28] images from float [N, 1, 28|32, 28|32] in [0, 1] or uint8 [N, (1,) 28, 28]."""
    if images.dtype == torch.uint8 and images.dim() == 3:
        images = images.unsqueeze(1)  # real FashionMNIST [N, 28, 28] -> [N, 1, 28, 28]
    sizes = ((IMAGE_SIZE, IMAGE_SIZE), (MODEL_SIZE, MODEL_SIZE))
    if images.dim() != 4 or images.shape[1] != 1 or tuple(images.shape[2:]) not in sizes:
        raise ValueError(f"images must be grey [N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}] or [N, 1, {MODEL_SIZE}, "
                         f"{MODEL_SIZE}], got {list(images.shape)}")
    if images.shape[-1] == MODEL_SIZE:
        images = crop_to_28(images)
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
    if images.numel() and (images.min() < 0 or images.max() > 1 or images.isnan().any()):
        raise ValueError(f"float images must lie in [0, 1], got values in [{images.min().item():.3g}, "
                         f"{images.max().item():.3g}]")
    # Rounded as a PNG writer rounds, so a generated image is scored as the file it would be saved to.
    return images.mul(255).round().to(torch.uint8)


def grid_tensor(images: torch.Tensor, nrow: Optional[int] = None) -> torch.Tensor:
    """Get float images [N, C, H, W] in [0, 1] as one near-square grid [3, H', W'], separated by white lines."""
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    return make_grid(images, nrow=nrow, padding=GRID_PADDING, pad_value=GRID_PAD_VALUE)  # 3 channels even for grey


def image_grid(images: torch.Tensor, nrow: Optional[int] = None) -> Image.Image:
    """Get float images [N, C, H, W] in [0, 1] as one near-square grid picture, separated by white lines."""
    return to_pil_image(grid_tensor(images, nrow))


def with_caption(image: Image.Image, caption: str) -> Image.Image:
    """Get the image with a one-line caption in a white strip above it (widened when the caption is longer)."""
    text_width = math.ceil(ImageDraw.Draw(image).textlength(caption)) + 4
    captioned = Image.new("RGB", (max(image.width, text_width), image.height + CAPTION_HEIGHT), "white")
    captioned.paste(image.convert("RGB"), (0, CAPTION_HEIGHT))
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
