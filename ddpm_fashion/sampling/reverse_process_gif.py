"""The reverse-process GIF of `ddpm-fashion sample --gif`: x_t beside the predicted x_0 at a few dozen steps.

Frame and image counts, timing and scale are chosen for a readable animation of a few MB.
"""

from typing import List, Tuple

import torch
from PIL import Image

from ddpm_fashion.sampling.generate import predicted_original
from ddpm_fashion.sampling.pictures import image_grid, side_by_side, to_unit_range, with_caption

# Enough frames to watch the noise turn into clothes; noisy frames barely compress, so more would cost megabytes.
MAX_GIF_FRAMES = 40
MAX_GIF_IMAGES = 16
GIF_FRAME_MS = 80
GIF_LAST_FRAME_MS = 2000
# Images are 28-32 px: scale them up so a GIF frame is readable on screen.
GIF_UPSCALE = 2


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
