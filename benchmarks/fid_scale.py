"""What an FID over the shipped classifier's features means: real images, slightly degraded, against the test set.

    python benchmarks/fid_scale.py [--num_samples 2000] [--seed 0] [--data_dir DIR] [--json fid_scale.json]

Scores N real training images (the floor of `ddpm-fashion evaluate --model real-train`), then the same images with
small, known degradations: Gaussian pixel noise (sigma in [0, 1] pixel units, as a sampler's leftover noise would
look) and Gaussian blur (sigma in pixels, 9x9 kernel). Prints FID, precision, recall and class KL for each, and the
FID as a multiple of the floor, so a generated model's FID can be read against degradations one can picture.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torchvision.transforms.functional import gaussian_blur

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ddpm_fashion.evaluation.sample_quality import Evaluator, real_training_images  # noqa: E402
from ddpm_fashion.guards.files import atomic_output, check_output_path  # noqa: E402

NOISE_SIGMAS = (0.01, 0.02, 0.05)
BLUR_SIGMAS = (0.4, 0.5, 0.7)


def degradations(images: torch.Tensor, seed: int) -> dict:
    """Get {name: images [N, 1, 28, 28] in [0, 1]}: the real images, then each degradation of them."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    variants = {"real training images (floor)": images}
    for sigma in NOISE_SIGMAS:
        variants[f"+ pixel noise, sigma {sigma}"] = (images + sigma * noise).clamp(0, 1)
    for sigma in BLUR_SIGMAS:
        variants[f"blur, sigma {sigma} px"] = gaussian_blur(images, kernel_size=9, sigma=sigma)
    return variants


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.json:
        try:  # before minutes of scoring: the report's folder exists and is writable
            check_output_path(args.json, (".json",), new=True)
        except ValueError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")

    evaluator = Evaluator(data_dir=args.data_dir)
    images = real_training_images(args.num_samples, args.seed, args.data_dir).float() / 255
    rows, floor = [], None
    print(f"N = {args.num_samples} real training images (seed {args.seed}) vs the {len(evaluator.reference)} test "
          "images")
    print(f"{'images':34} {'FID':>8} {'x floor':>8} {'precision':>9} {'recall':>7} {'class KL':>9}")
    for name, variant in degradations(images, args.seed).items():
        report = evaluator.evaluate(variant)
        floor = report["fid"] if floor is None else floor
        row = {"images": name, "fid": report["fid"], "times_floor": report["fid"] / floor,
               "precision": report["precision"], "recall": report["recall"],
               "class_kl_from_uniform": report["class_kl_from_uniform"]}
        rows.append(row)
        print(f"{name:34} {row['fid']:8.3f} {row['times_floor']:8.1f} {row['precision']:9.3f} {row['recall']:7.3f} "
              f"{row['class_kl_from_uniform']:9.4f}")
    if args.json:
        with atomic_output(Path(args.json)) as staging:  # a crash leaves the old report or the new one
            staging.write_text(json.dumps({"num_samples": args.num_samples, "seed": args.seed, "rows": rows},
                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
