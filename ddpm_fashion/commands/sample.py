"""`ddpm-fashion sample`: a grid of generated images, and with --gif an animation of the reverse process."""

import argparse

from ddpm_fashion.checks import positive_int
from ddpm_fashion.commands.options import IMAGE_SUFFIXES, add_model_options, add_scheduler_option, protected_outputs
from ddpm_fashion.files import atomic_output, check_output_path
from ddpm_fashion.saved_pipeline import UNET_CHOICES

# Float copies of all images held at once: the images, and their grid (three channels even for grey).
IMAGE_COPIES = 4


def run(args: argparse.Namespace) -> int:
    """Generate a grid of images, and with --gif an animation of the reverse process."""
    from ddpm_fashion import sampling
    from ddpm_fashion.pictures import image_grid
    from ddpm_fashion.reverse_process_gif import ReverseProcessRecorder, save_gif
    from ddpm_fashion.saved_pipeline import load_pipeline

    protected = protected_outputs(args.model)
    out = check_output_path(args.out, IMAGE_SUFFIXES, protected)
    gif = check_output_path(args.gif, (".gif",), protected) if args.gif else None
    pipe = load_pipeline(args.model, scheduler=args.scheduler, unet=args.unet, device=args.device)
    steps = sampling.inference_steps(pipe, args.scheduler, args.num_inference_steps)
    sampling.check_sampling_memory(pipe, min(args.batch_size, args.num_images), args.num_images, "--batch_size",
                                   "--num_images", IMAGE_COPIES)
    recorder = ReverseProcessRecorder(pipe.scheduler, steps) if gif else None
    images = sampling.generate_images(pipe, args.num_images, args.batch_size, steps, args.seed, on_step=recorder)
    with atomic_output(out) as staging:
        image_grid(images).save(staging)
    print(f"wrote {len(images)} images ({args.scheduler} scheduler, {steps} steps) to {out}")
    if gif:
        pictures = recorder.pictures(images)
        with atomic_output(gif) as staging:
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
    parser.add_argument("--out", default="samples.png", help="grid image (png, jpg, ...)")
    parser.add_argument("--gif", default=None, help="also write the reverse process (x_t and predicted x_0) here")
    parser.set_defaults(func=run, memory_option="--batch_size")
    return parser
