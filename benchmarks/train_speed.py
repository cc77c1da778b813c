"""Training throughput: train_accelerate.py vs the approach of diffusers' examples/unconditional_image_generation.

    python benchmarks/train_speed.py [--steps 30] [--rounds 2] [--batch_size 64] [--launcher python|accelerate]
        [--mixed_precision no|bf16]

Both sides train the same UNet2DModel config (the speed-reference U-Net: (32, 64, 128), one resnet per level,
attention at 16x16, GroupNorm 8 groups, 1 channel) at the same batch size and precision (fp32, or both under
Accelerate's bf16 autocast with --mixed_precision bf16), in one process, alternating
rounds so machine noise hits both. The reference is train_unconditional.py's loop: a DataLoader over the
`datasets` FashionMNIST with torchvision transforms (Resize, CenterCrop, RandomHorizontalFlip, ToTensor,
Normalize), UNet2DModel, diffusers' DDPMScheduler, AdamW (unfused, as there), cosine LR, EMAModel and gradient
clipping under Accelerate. Ours is train_accelerate.main() with our U-Net, scheduler and in-memory data path, run
in this process (--launcher python) or as the README runs it, `accelerate launch train_accelerate.py` in a child
process (--launcher accelerate: the trainer then picks its own threads, as it does for users).
Prints median img/s of each, the ratio, and the share of the physical ceiling (FLOPs per image / matmul rate).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from torchvision import transforms

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_accelerate  # noqa: E402
from ddpm_fashion.data import fashion_mnist_dataset  # noqa: E402

UNET = {"sample_size": 32, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64, 128],
        "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8}


def reference_images_per_second(dataset, steps, batch_size, mixed_precision="no"):
    """diffusers' train_unconditional.py loop, reduced to what runs per step; img/s after warm-up."""
    augment = transforms.Compose([
        transforms.Resize(32, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(32),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    dataset = dataset.with_transform(lambda examples: {"input": [augment(im.convert("L")) for im in examples["image"]]})
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
    torch.manual_seed(0)
    model = UNet2DModel(**UNET)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=10_000)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    start = time.perf_counter()  # like ours, the clock covers data loading and every step of the loop
    for step, batch in enumerate(loader):
        clean = batch["input"]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, 1000, (clean.shape[0],), device=clean.device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with accelerator.accumulate(model):
            loss = F.mse_loss(model(noisy, timesteps).sample.float(), noise.float())
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        ema.step(model.parameters())
        if step + 1 == steps:
            break
    return batch_size * steps / (time.perf_counter() - start)


def ours_images_per_second(steps, batch_size, output_dir, launcher="python", mixed_precision="no"):
    """Run train_accelerate for `steps` steps in this process or under accelerate launch; returns its summary line."""
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), "--output_dir", output_dir, "--logger", "none",
            "--train_batch_size", str(batch_size), "--max_train_steps", str(steps),
            "--checkpointing_steps", "100000", "--save_images_steps", "100000", "--use_ema", "true",
            "--learning_rate", "1e-4", "--eval_batch_size", "1", "--ddpm_num_inference_steps", "1",
            "--mixed_precision", mixed_precision]
    for key, value in UNET.items():
        args += [f"--unet.{key}", str(value)]
    if launcher == "accelerate":
        accelerate = Path(sys.executable).parent / "accelerate"
        env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
        result = subprocess.run([str(accelerate), "launch", "--num_processes", "1", str(ROOT / "train_accelerate.py"),
                                 *args], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"accelerate launch failed ({result.returncode}): {result.stderr[-2000:]}")
        return result.stdout + result.stderr
    captured = StringIO()
    with redirect_stdout(captured), redirect_stderr(StringIO()):
        code = train_accelerate.main(args)
    if code != 0:
        raise RuntimeError(f"train_accelerate.main failed with exit code {code}")
    return captured.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the reference (and ours in-process)")
    parser.add_argument("--launcher", choices=("python", "accelerate"), default="python",
                        help="run ours in this process, or through `accelerate launch` as the README does")
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default="no",
                        help="both sides: fp32, or Accelerate's bf16 autocast (the examples' --mixed_precision bf16)")
    parser.add_argument("--ceiling", type=float, default=None,
                        help="optional fp32 ceiling in img/s to report shares of: FLOPs per image per training step "
                             "(2.26 GFLOP for this U-Net) over a large fp32 matmul's rate on this machine's cores")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DDPM_FASHION_NUM_THREADS", str(args.threads))  # ours in-process: the same threads
    dataset = fashion_mnist_dataset("train")
    ours, reference = [], []
    for round_index in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = ours_images_per_second(args.steps, args.batch_size, f"{tmp}/out", args.launcher,
                                             args.mixed_precision)
            total = time.perf_counter() - start
        match = re.search(r"done: \d+ steps, \d+ images seen, (\d+) s this session, ([\d.]+) img/s", summary)
        threads = re.search(r"(\d+) torch threads per process", summary)
        ours.append(float(match.group(2)))
        reference.append(reference_images_per_second(dataset, args.steps, args.batch_size, args.mixed_precision))
        print(f"round {round_index}: ours {ours[-1]:.1f} img/s ({args.launcher}, {threads.group(1)} threads; whole "
              f"script {total:.0f} s incl. start-up), "
              f"reference {reference[-1]:.1f} img/s", flush=True)
    ours_median, reference_median = statistics.median(ours), statistics.median(reference)
    precision = "fp32" if args.mixed_precision == "no" else "bf16 autocast"
    print(f"train_accelerate.py: {ours_median:.1f} img/s   diffusers example approach: {reference_median:.1f} img/s"
          f"   ratio {ours_median / reference_median:.2f}x   (batch {args.batch_size}, {precision}, reference "
          f"{args.threads} threads, ours via {args.launcher})")
    if args.ceiling:
        print(f"share of the {args.ceiling:.0f} img/s fp32 ceiling: ours {ours_median / args.ceiling:.0%}, "
              f"reference {reference_median / args.ceiling:.0%}")


if __name__ == "__main__":
    main()
