"""How much of a model's FID is its background: near-black pixel shares, and FID with them set to black.

    python benchmarks/dark_pixels.py --model out-cpu [--scheduler dpm] [--num_inference_steps 20]
        [--num_samples 1000] [--batch_size 250] [--seed 0] [--images FILE] [--json dark_pixels.json]

FashionMNIST's background is exactly black: half of the pixels of the test images are 0. A sampler lands exactly on
that boundary only where the U-Net is accurate at the lowest noise levels, so a generated background can be left a
little grey, which FID over the classifier's features counts (benchmarks/fid_scale.py: pixel noise of sigma 0.01 is
2.6x the floor). For N real training images (the floor) and N generated ones (sampled as `ddpm-fashion evaluate`
samples them, or read from `--images`, a safetensors file with an `images` tensor such as evaluate's
--samples_file), this prints the share of pixels at 0 and at 1-7 (of 255), then FID, precision, recall and class
KL (fmnist features against the test set) after setting every pixel <= k/255 to 0, for each k in THRESHOLDS.
The real images show what the snapping costs data whose background is already black. With --model it also gives
the why: the U-Net's error in x_0_hat on noised test images at small timesteps, over all pixels and over the black
background, beside the noise level it had to remove (sqrt((1 - alpha_bar_t) / alpha_bar_t), the error of x_t /
sqrt(alpha_bar_t)). A diagnosis, not a sampler: the images a pipeline makes are never snapped.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ddpm_fashion.data import (
    load_fashion_mnist,  # noqa: E402
    to_model_input,  # noqa: E402
)
from ddpm_fashion.evaluation.metrics import pixel_shares  # noqa: E402
from ddpm_fashion.evaluation.sample_quality import Evaluator, real_training_images  # noqa: E402
from ddpm_fashion.guards.files import atomic_output, check_output_path  # noqa: E402
from ddpm_fashion.sampling.generate import generate_images, inference_steps, predicted_original  # noqa: E402
from ddpm_fashion.sampling.pictures import to_uint8_images  # noqa: E402
from ddpm_fashion.sampling.saved_pipeline import SCHEDULER_CHOICES, load_pipeline  # noqa: E402

THRESHOLDS = (0, 1, 2, 4, 8)  # k: pixels <= k/255 become 0; 0 is the images as they are
LOW_TIMESTEPS = (0, 2, 5, 10, 20, 50, 100, 200)
ACCURACY_IMAGES = 256  # test images noised at each timestep


def snap_dark_pixels(images: torch.Tensor, threshold: int) -> torch.Tensor:
    """Get uint8 images with every pixel <= threshold set to 0."""
    return images.masked_fill(images <= threshold, 0)


def rows_for(name: str, images: torch.Tensor, evaluator: Evaluator) -> list:
    """Score uint8 images [N, 1, 28, 28] as they are and snapped at each threshold: one row per threshold."""
    rows = []
    for threshold in THRESHOLDS:
        snapped = snap_dark_pixels(images, threshold)
        report = evaluator.evaluate(snapped)
        rows.append({"images": name, "snapped_at_or_below": threshold, **pixel_shares(snapped),
                     "fid": report["fid"], "precision": report["precision"], "recall": report["recall"],
                     "class_kl_from_uniform": report["class_kl_from_uniform"]})
        print(f"{name:24} {threshold:>6} {rows[-1]['black_share']:7.3f} {rows[-1]['near_black_share']:9.3f} "
              f"{report['fid']:8.4f} {report['precision']:9.3f} {report['recall']:7.3f} "
              f"{report['class_kl_from_uniform']:9.4f}", flush=True)
    return rows


@torch.no_grad()
def low_noise_errors(pipe, test_images: torch.Tensor, seed: int) -> list:
    """Get the RMS error of the U-Net's x_0_hat on noised test images at each of LOW_TIMESTEPS (model units)."""
    clean = to_model_input(test_images[:ACCURACY_IMAGES])  # [B, 1, 32, 32]
    background = clean == -1
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for timestep in LOW_TIMESTEPS:
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.full((len(clean),), timestep, dtype=torch.long)
        noisy = pipe.scheduler.add_noise(clean, noise, timesteps)
        error = predicted_original(pipe.scheduler, pipe.unet(noisy, timesteps).sample, timestep, noisy) - clean
        alpha_bar = float(pipe.scheduler.alphas_cumprod[timestep])
        rows.append({"timestep": timestep, "noise_level": ((1 - alpha_bar) / alpha_bar) ** 0.5,
                     "x0_rms_error": float(error.pow(2).mean().sqrt()),
                     "background_rms_error": float(error[background].pow(2).mean().sqrt()),
                     "background_mean_error": float(error[background].mean())})
        print(f"t = {timestep:4d}: noise level {rows[-1]['noise_level']:.4f}, x0_hat RMS error "
              f"{rows[-1]['x0_rms_error']:.4f}, on the background {rows[-1]['background_rms_error']:.4f} "
              f"(mean {rows[-1]['background_mean_error']:+.4f})", flush=True)
    return rows


def generated_images(args) -> torch.Tensor:
    """Get the generated images as uint8 [N, 1, 28, 28]: read from --images, or sampled from --model."""
    if args.images:
        images = load_file(args.images).get("images")
        if images is None or images.dim() != 4:
            raise ValueError(f"{args.images} holds no 'images' tensor [N, C, H, W]")
        return to_uint8_images(images[:args.num_samples])
    pipe = load_pipeline(args.model, scheduler=args.scheduler, device="cpu")
    steps = inference_steps(pipe, args.scheduler, args.num_inference_steps)
    return to_uint8_images(generate_images(pipe, args.num_samples, args.batch_size, steps, args.seed, progress=False))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="folder of a saved DDPMPipeline: sampled unless --images is given")
    parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default="dpm")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--images", default=None, help="score the `images` of this safetensors file instead")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not (args.model or args.images):
        parser.error("give --model (to sample from it), --images (to read images), or both (--images are scored)")
    try:  # before minutes of sampling: the report's folder exists and is writable
        if args.json:
            check_output_path(args.json, (".json",), new=True)
        generated = generated_images(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")

    evaluator = Evaluator("fmnist", "test", args.data_dir, args.batch_size)
    source = args.images or f"{args.model}, {args.scheduler} {args.num_inference_steps} steps"
    print(f"N = {len(generated)} images of {source} (seed {args.seed}) vs the {len(evaluator.reference)} test images")
    test_images = load_fashion_mnist("test", args.data_dir)[0]
    reference_shares = pixel_shares(test_images)
    print(f"test images (the reference): black {reference_shares['black_share']:.3f}, 1-7/255 "
          f"{reference_shares['near_black_share']:.3f}")
    print(f"{'images':24} {'<= k':>6} {'black':>7} {'1-7/255':>9} {'FID':>8} {'precision':>9} {'recall':>7} "
          f"{'class KL':>9}")
    rows = rows_for("real training images", real_training_images(len(generated), args.seed, args.data_dir), evaluator)
    rows += rows_for("generated", generated, evaluator)
    # A fresh load, with the DDPM scheduler: a fast sampler's add_noise indexes only its own (set) timesteps.
    accuracy = low_noise_errors(load_pipeline(args.model, device="cpu"), test_images, args.seed) if args.model else []
    if args.json:
        with atomic_output(Path(args.json)) as staging:
            staging.write_text(json.dumps({"source": source, "num_samples": len(generated), "seed": args.seed,
                                           "features": "fmnist", "reference": "test",
                                           "reference_shares": reference_shares,
                                           "rows": rows, "low_noise_errors": accuracy}, indent=2) + "\n")


if __name__ == "__main__":
    main()
