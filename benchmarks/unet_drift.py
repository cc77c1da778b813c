"""How far one U-Net forward moves with the code layout: ours vs UNet2DModel, and UNet2DModel vs itself.

    python benchmarks/unet_drift.py --model out-cpu [--batch_size 8] [--seed 0]

Prints max |difference| of one forward at t = 999, 500, 50 on the same noise for: our UNet (as shipped: channels-last,
with the fused transposed-convolution upsampler); our UNet with the upsampler computed as nearest x2 + 3x3
convolution; our UNet in reference mode (`reference_mode = True`, what `compare` proves equality with: bitwise 0
is expected); UNet2DModel converted to channels-last. If the last matches the first, the differences come from the
memory layout of the convolutions, not from our arithmetic. Sampling over 1000 steps accumulates these.
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ddpm_fashion.models.unet import UNet  # noqa: E402
from ddpm_fashion.models.unet_blocks import Upsample  # noqa: E402

TIMESTEPS = (999, 500, 50)


def max_differences(model, reference, sample):
    """Get max |model - reference| of one forward at each of TIMESTEPS."""
    with torch.no_grad():
        return [(model(sample, t).sample - reference(sample, t).sample).abs().max().item() for t in TIMESTEPS]


def nearest_then_conv(self, x):
    """The upsampler as UNet2DModel computes it: nearest x2, then the 3x3 convolution."""
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved DDPMPipeline folder")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reference = UNet2DModel.from_pretrained(args.model, subfolder="unet").eval()
    ours = UNet.from_diffusers(reference).eval()
    size = reference.config.sample_size
    sample = torch.randn(args.batch_size, reference.config.in_channels, size, size,
                         generator=torch.Generator().manual_seed(args.seed))
    print(f"max |difference| of one forward vs UNet2DModel at t = {TIMESTEPS}, batch {args.batch_size}:")
    print(f"  ours (fused upsampler)            {max_differences(ours, reference, sample)}")
    shipped = Upsample.forward
    Upsample.forward = nearest_then_conv
    try:
        print(f"  ours (nearest + conv upsampler)   {max_differences(ours, reference, sample)}")
    finally:
        Upsample.forward = shipped
    ours.reference_mode = True
    print(f"  ours, reference_mode=True         {max_differences(ours, reference, sample)}")
    ours.reference_mode = False
    channels_last = copy.deepcopy(reference).to(memory_format=torch.channels_last)
    print(f"  UNet2DModel, channels-last        {max_differences(channels_last, reference, sample)}")


if __name__ == "__main__":
    main()
