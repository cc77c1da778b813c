"""Images/s of our training input path vs the DataLoader + torchvision path of diffusers' train_unconditional.py.

Ours: the train split as one uint8 tensor, `images[batch.indices]` from ShardedBatchSampler, then
`to_model_input` with random flips (pad 28->32, mirror, scale to [-1, 1]) on the whole batch at once.
Reference: a torch DataLoader over `fashion_mnist_dataset("train")` whose `with_transform` runs, per image,
Pad(2) (or Resize(32), as diffusers does) + RandomHorizontalFlip + ToTensor + Normalize([0.5], [0.5]).
Both make float32 [128, 1, 32, 32] batches in [-1, 1]; both are timed in this one run, data loading excluded.

    python benchmarks/data_speed.py                 # pad reference, num_workers 0 and 2
    python benchmarks/data_speed.py --reference resize
"""

import argparse
import statistics
import sys
import time

import torch
import torchvision.transforms as T

from ddpm_fashion.data import ShardedBatchSampler, fashion_mnist_dataset, load_fashion_mnist, to_model_input

WARMUP_BATCHES = 5


def time_ours(images: torch.Tensor, batch_size: int, epochs: int, seed: int) -> float:
    """Get images/s of index + to_model_input over whole epochs (the median epoch)."""
    sampler = ShardedBatchSampler(len(images), batch_size, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    rates = []
    for _ in range(epochs):
        count, start = 0, time.perf_counter()
        for batch in sampler:
            flip = torch.rand(len(batch.indices), generator=generator) < 0.5
            x = to_model_input(images[batch.indices], flip)
            count += len(x)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def reference_transform(kind: str):
    """Get the per-image torchvision pipeline that train_unconditional.py uses, with Pad(2) or Resize(32)."""
    size_step = T.Pad(2, fill=0) if kind == "pad" else T.Resize(32, interpolation=T.InterpolationMode.BILINEAR)
    augmentations = T.Compose([size_step, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5], [0.5])])

    def transform(examples):
        return {"input": [augmentations(image) for image in examples["image"]]}

    return transform


def time_reference(dataset, batch_size: int, num_workers: int, batches: int, seed: int) -> float:
    """Get images/s of a shuffled DataLoader over the transformed dataset, after a few warm-up batches."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(seed), drop_last=True)
    iterator = iter(loader)
    for _ in range(WARMUP_BATCHES):  # also lets the workers start
        next(iterator)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        count += len(next(iterator)["input"])
    return count / (time.perf_counter() - start)


def main(argv=None):
    """Measure both paths in one run and print images/s, the ratio and the command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="whole epochs timed for our path (median reported)")
    parser.add_argument("--reference_batches", type=int, default=100, help="batches timed per reference run")
    parser.add_argument("--num_workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--reference", choices=["pad", "resize"], default="pad")
    parser.add_argument("--device", default="cpu", help="where our path keeps the split (cpu or cuda)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print(f"command: python benchmarks/data_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"ours on {args.device}")
    images, _ = load_fashion_mnist("train", args.data_dir)
    ours = time_ours(images.to(args.device), args.batch_size, args.epochs, args.seed)
    print(f"ours  (index + to_model_input, random flips): {ours:12,.0f} images/s")

    dataset = fashion_mnist_dataset("train", args.data_dir).with_transform(reference_transform(args.reference))
    slowest_ratio = float("inf")
    for workers in args.num_workers:
        rate = time_reference(dataset, args.batch_size, workers, args.reference_batches, args.seed)
        slowest_ratio = min(slowest_ratio, ours / rate)
        print(f"DataLoader + torchvision {args.reference}, num_workers={workers}: {rate:12,.0f} images/s  "
              f"-> ours is {ours / rate:,.1f}x")
    meets = ours >= 50_000 and slowest_ratio >= 20
    print(f"target >= 20x and >= 50,000 images/s: {'met' if meets else 'NOT met'} "
          f"(worst ratio {slowest_ratio:,.1f}x, ours {ours:,.0f} images/s)")


if __name__ == "__main__":
    main()
