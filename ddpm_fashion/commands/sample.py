"""`ddpm-fashion sample`: a grid of generated images, and with --gif an animation of the reverse process."""

import argparse
import math
from pathlib import Path
from typing import Optional

from ddpm_fashion.commands.options import (
    IMAGE_SUFFIXES,
    add_model_options,
    add_scheduler_option,
    check_free_space,
    check_new_output,
    writing,
)
from ddpm_fashion.guards.inputs import positive_int
from ddpm_fashion.sampling.saved_pipeline import UNET_CHOICES

# Float copies of all images held at once: the images, and their grid (three channels even for grey).
IMAGE_COPIES = 4
# The most a PNG file adds to its deflated pixels: signature, IHDR and IEND, and slack for any small chunk.
PNG_FIXED_BYTES = 8 + 25 + 12 + 1024
PNG_CHUNK_BYTES = 12  # length, type and CRC of every IDAT chunk


def png_grid_bytes(num_images: int, image_shape, padding: int) -> int:
    """Get an upper bound of the size of the PNG file of a grid of num_images images (as pictures.image_grid).

    The grid is near-square (ceil(sqrt(n)) images a row) with `padding` pixels around each image, and RGB even for
    grey images. Deflate never makes data longer than zlib's compressBound, whatever the pixels; IDAT chunks are
    counted as if each held only 1 KiB (PIL writes 64 KiB ones).
    """
    _, height, width = image_shape
    per_row = math.ceil(math.sqrt(num_images))
    rows = math.ceil(num_images / per_row)
    grid_height, grid_width = rows * (height + padding) + padding, per_row * (width + padding) + padding
    raw = grid_height * (1 + 3 * grid_width)  # every row starts with its filter byte
    deflated = raw + (raw >> 12) + (raw >> 14) + (raw >> 25) + 13
    return PNG_FIXED_BYTES + deflated + PNG_CHUNK_BYTES * (deflated // 1024 + 2)


def grid_file_bytes(out: Path, num_images: int, image_shape) -> Optional[int]:
    """Get an upper bound of the size of the grid file `out` (None where its format gives none: JPEG, WebP, ...)."""
    from ddpm_fashion.sampling.pictures import GRID_PADDING

    return png_grid_bytes(num_images, image_shape, GRID_PADDING) if out.suffix.lower() == ".png" else None


def run(args: argparse.Namespace) -> int:
    """Generate a grid of images, and with --gif an animation of the reverse process."""
    from ddpm_fashion.sampling import generate
    from ddpm_fashion.sampling.pictures import image_grid
    from ddpm_fashion.sampling.reverse_process_gif import ReverseProcessRecorder, save_gif
    from ddpm_fashion.sampling.saved_pipeline import load_pipeline

    out = check_new_output(args.out, IMAGE_SUFFIXES, args.model)
    gif = check_new_output(args.gif, (".gif",), args.model) if args.gif else None
    pipe = load_pipeline(args.model, scheduler=args.scheduler, unet=args.unet, device=args.device)
    steps = generate.inference_steps(pipe, args.scheduler, args.num_inference_steps)
    generate.check_sampling_memory(pipe, min(args.batch_size, args.num_images), args.num_images, "--batch_size",
                                   "--num_images", IMAGE_COPIES)
    grid_bytes = grid_file_bytes(out, args.num_images, generate.sample_shape(pipe))
    check_free_space([(out, grid_bytes)] if grid_bytes is not None else [])
    recorder = ReverseProcessRecorder(pipe.scheduler, steps) if gif else None
    images = generate.generate_images(pipe, args.num_images, args.batch_size, steps, args.seed, on_step=recorder)
    with writing(out) as staging:
        image_grid(images).save(staging)
    print(f"wrote {len(images)} images ({args.scheduler} scheduler, {steps} steps) to {out}")
    if gif:
        pictures = recorder.pictures(images)
        with writing(gif) as staging:
            save_gif(pictures, staging)
        print(f"wrote the reverse process ({len(pictures)} frames) to {gif}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `sample` subcommand."""
    parser = subparsers.add_parser("sample", help="generate a grid of images (and a GIF of the reverse process)")
    add_model_options(parser)
    add_scheduler_option(parser)
    parser.add_argument("--unet", choices=UNET_CHOICES, default="diffusers", help="which U-Net code runs the weights")
    parser.add_argument("--num_images", type=positive_int, default=64)
    parser.add_argument("--batch_size", type=positive_int, default=64, help="images per batch; bounds the memory")
    parser.add_argument("--out", default="samples.png",
                        help="grid image (png, jpg, ...); a new file: an existing one is never replaced")
    parser.add_argument("--gif", default=None, help="also write the reverse process (x_t and predicted x_0) here")
    parser.set_defaults(func=run, memory_option="--batch_size")
    return parser
