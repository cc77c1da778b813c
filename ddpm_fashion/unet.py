"""Our own U-Net: the network of diffusers' UNet2DModel, written from its small blocks and tuned for speed.

Every parameter has UNet2DModel's name and shape, so weights move between the two with no renaming, and for the
same weights and input the outputs agree to float rounding (tests/test_unet.py proves both). What differs is how
the same arithmetic is laid out:

- activations stay channels-last (NHWC) from the first convolution to the last, which oneDNN's convolutions run
  faster on a CPU, and which turns the image into a token sequence for attention without a copy;
- the query, key and value projections are one matrix product instead of three;
- an upsampler (nearest x2, then a 3x3 convolution) is one stride-2 transposed 4x4 convolution whose kernel sums
  the 3x3 taps that land on the same source pixel: the same result with 16 instead of 36 multiply-adds per pixel;
- work that changes nothing is skipped: dividing by a scale factor of 1, dropout with p = 0, and (without
  autograd) a separate output buffer for SiLU.

`unet.reference_mode = True` undoes what changes the rounding: activations take the memory layouts they have in
UNet2DModel (NCHW until the first attention block, channels-last after it, NCHW again where diffusers switches back
for batches of 64 and more), upsampling is two steps, attention is diffusers' AttnProcessor2_0 op for op, and
scale-shift conditioning multiplies and adds in two roundings. The outputs are then bitwise UNet2DModel's on the
same machine (tests/test_unet.py, every test configuration; the reference model at batch 8 and 64), at
UNet2DModel's speed. `ddpm-fashion compare` uses it: over hundreds of sampling steps even the ~1e-6 rounding
differences of another layout grow past 1e-5. One exception, measured: at batch 1 a Linear runs as a matrix-vector
product whose rounding depends on the weights' memory alignment, which differs between the two loaders, so the time
embedding can differ in the last bit.

Measured and left out: a matmul-softmax attention (plain, or chunked with a hand-written backward) is 2-3x slower
than PyTorch's CPU flash kernel at these sizes; a hand-written weight gradient for the one-channel input
convolution is faster on its own but saves under 1% of a step. benchmarks/unet_speed.py measures the network.

Files are diffusers' unet folder layout (config.json + diffusion_pytorch_model.safetensors); loading is strict.
"""

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", None)
ACTIVATIONS = ("silu", "swish")  # the same function under diffusers' two names
TIME_SCALE_SHIFTS = ("default", "scale_shift")
CLASS_NAMES = ("UNet2DModel", "UNet")  # a config.json written by either class describes the same network


@dataclass
class UNetOutput(BaseOutput):
    """The denoiser's prediction, shaped like its input; `.sample` or `[0]`, as diffusers' UNet2DOutput."""

    sample: torch.Tensor


def timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """Get the sinusoidal embedding (N, dim) of N timesteps (Ho et al. 2020, section B)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half - freq_shift))
    angles = timesteps[:, None].float() * frequencies[None, :]  # (N, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    embedding = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def timesteps_for_batch(timestep, batch_size, device):
    """Get one timestep per sample from an int, a 0-d tensor, or a 1-d tensor of length 1 or batch_size."""
    if not torch.is_tensor(timestep):
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
            raise ValueError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        # A Python number becomes an integer step, as in UNet2DModel (which truncates floats the same way).
        timestep = torch.tensor([timestep], dtype=torch.long)
    elif timestep.ndim == 0:
        timestep = timestep[None]
    elif timestep.ndim != 1 or timestep.shape[0] not in (1, batch_size):
        raise ValueError(f"timestep tensor must be 0-d or 1-d of length 1 or {batch_size}, "
                         f"got shape {tuple(timestep.shape)}")
    return timestep.to(device).expand(batch_size)


def fresh_silu(x):
    """Get SiLU(x) of an intermediate nothing else reads; in place when autograd records nothing (saves a copy)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def memory_format_of(tensor) -> torch.memory_format:
    """Get the memory order a 4-d activation is laid out in: channels-last (NHWC) or the usual NCHW."""
    return torch.channels_last if tensor.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class TimestepMLP(nn.Module):
    """Map the sinusoidal timestep embedding to the width the resnet blocks are conditioned on."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, embedding):
        """Get the conditioning vector (N, out_features)."""
        return self.linear_2(F.silu(self.linear_1(embedding)))


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv layers around a skip connection, with the timestep added or used as scale and shift."""

    def __init__(self, in_channels, out_channels, temb_channels, groups, eps, dropout, time_scale_shift,
                 output_scale_factor=1.0):
        super().__init__()
        self.time_scale_shift = time_scale_shift
        self.output_scale_factor = output_scale_factor
        self.dropout = dropout
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        temb_out = 2 * out_channels if time_scale_shift == "scale_shift" else out_channels
        self.time_emb_proj = nn.Linear(temb_channels, temb_out)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # A 1x1 convolution matches the channel counts of the skip path only where they differ.
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        self.reference_mode = False  # set by UNet.reference_mode

    def forward(self, x, temb_act):
        """Get the block's output; temb_act is SiLU of the timestep embedding, computed once for all blocks."""
        h = self.conv1(fresh_silu(self.norm1(x)))
        time = self.time_emb_proj(temb_act)[:, :, None, None]  # (N, C or 2C, 1, 1)
        if self.time_scale_shift == "scale_shift":
            scale, shift = time.chunk(2, dim=1)
            if self.reference_mode:
                h = self.norm2(h) * (1 + scale) + shift  # UNet2DModel's two roundings
            else:
                h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + time)
        h = fresh_silu(h)
        if self.dropout > 0 and self.training:
            # CPU dropout draws its mask in memory order. Drawing it in NCHW order keeps it independent of our layout
            # and equal to UNet2DModel's wherever that model's activations are NCHW (everywhere before attention).
            layout = memory_format_of(h)
            h = F.dropout(h.contiguous(), self.dropout, training=True).contiguous(memory_format=layout)
        h = self.conv2(h)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels, head_dim, norm_groups, eps, output_scale_factor=1.0):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"attention_head_dim={head_dim} must divide the {channels} channels of an attention block")
        self.heads = channels // head_dim
        self.output_scale_factor = output_scale_factor
        self.group_norm = nn.GroupNorm(norm_groups, channels, eps=eps) if norm_groups is not None else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only for UNet2DModel's key `to_out.0`
        self.reference_mode = False  # set by UNet.reference_mode

    def forward(self, x):
        """Get x plus attention over its pixels; x is (N, C, H, W), channels-last in memory."""
        if self.reference_mode:
            return self._reference_forward(x)
        n, c, height, width = x.shape
        h = self.group_norm(x) if self.group_norm is not None else x
        tokens = h.permute(0, 2, 3, 1).reshape(n, height * width, c)  # (N, HW, C), a view of channels-last memory
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        bias = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])
        qkv = F.linear(tokens, weight, bias).view(n, height * width, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, HW, head_dim)
        attended = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, head_dim)
        attended = self.to_out[0](attended.transpose(1, 2).reshape(n, height * width, c))  # (N, HW, C)
        out = attended.view(n, height, width, c).permute(0, 3, 1, 2) + x  # (N, C, H, W), channels-last again
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor

    def _reference_forward(self, x):
        """UNet2DModel's attention (diffusers' AttnProcessor2_0) op for op, so that it rounds the same."""
        n, c, height, width = x.shape
        tokens = x.view(n, c, height * width).transpose(1, 2)  # (N, HW, C), whatever x's layout
        if self.group_norm is not None:
            tokens = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2)  # normalised over the (N, C, HW) view
        head_dim = c // self.heads
        q, k, v = (projection(tokens).view(n, -1, self.heads, head_dim).transpose(1, 2)
                   for projection in (self.to_q, self.to_k, self.to_v))  # each (N, heads, HW, head_dim)
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = self.to_out[0](attended.transpose(1, 2).reshape(n, -1, c))  # (N, HW, C)
        out = attended.transpose(-1, -2).reshape(n, c, height, width) + x  # channels-last, as in UNet2DModel
        return out / self.output_scale_factor


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution (padding 0 pads only right and bottom, as in DDPM)."""

    def __init__(self, channels, padding):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x):
        """Get x at half the resolution."""
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


# Which of the 3 taps of a 3x3 convolution after nearest x2 upsampling fall on each of the 4 taps of the equivalent
# stride-2 transposed convolution, along one axis (derivation in Upsample.forward).
_UPSAMPLE_TAP_SUMS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 convolution (computed as one transposed convolution)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        # Not persistent: the file holds only UNet2DModel's tensors; this constant follows the module's device.
        self.register_buffer("tap_sums", torch.tensor(_UPSAMPLE_TAP_SUMS), persistent=False)
        self.reference_mode = False  # set by UNet.reference_mode

    def forward(self, x):
        """Get x at twice the resolution, equal to conv3x3(nearest_upsample(x))."""
        if self.reference_mode:  # UNet2DModel's two steps, and its layout switch (diffusers issue 984)
            if x.shape[0] >= 64 or 2 * x.numel() > 2 ** 31:
                x = x.contiguous()
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        # Output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = source rows i-1, i, i: taps (w0 | w1 + w2);
        # output row 2i+1 reads rows 2i, 2i+1, 2i+2 = source rows i, i, i+1: taps (w0 + w1 | w2). A transposed
        # convolution with stride 2, padding 1 and the 4-tap kernel (w2, w1+w2, w0+w1, w0) computes exactly that.
        weight = self.conv.weight
        with torch.autocast(weight.device.type, enabled=False):  # sum the taps at the weights' own precision
            taps = self.tap_sums.to(weight.dtype)
            kernel = torch.einsum("pu,qv,oiuv->iopq", taps, taps, weight)  # (C_in, C_out, 4, 4)
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)


class DownBlock(nn.Module):
    """One encoder level: resnet blocks (each followed by attention in AttnDownBlock2D), then a downsampler."""

    def __init__(self, in_channels, out_channels, num_layers, with_attention, add_downsample, resnet_kwargs,
                 attention_kwargs, downsample_padding):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, **resnet_kwargs)
            for i in range(num_layers))
        if with_attention:
            self.attentions = nn.ModuleList(AttentionBlock(out_channels, **attention_kwargs) for _ in range(num_layers))
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample(out_channels, downsample_padding)]) if add_downsample else None

    def forward(self, x, temb_act):
        """Get the level's output and the activations it hands to the decoder's skip connections."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb_act)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """The bottleneck: a resnet block, then (attention, resnet block)."""

    def __init__(self, channels, resnet_kwargs, attention_kwargs, add_attention):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, **resnet_kwargs) for _ in range(2))
        self.attentions = nn.ModuleList([AttentionBlock(channels, **attention_kwargs)]) if add_attention else None

    def forward(self, x, temb_act):
        """Get the bottleneck's output."""
        x = self.resnets[0](x, temb_act)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, temb_act)


class UpBlock(nn.Module):
    """One decoder level: resnet blocks on [x, skip] (each followed by attention in AttnUpBlock2D), then an upsampler."""

    def __init__(self, in_channels, prev_output_channels, out_channels, num_layers, with_attention, add_upsample,
                 resnet_kwargs, attention_kwargs):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            x_channels = prev_output_channels if i == 0 else out_channels
            # The last skip of a level comes from the encoder level below it, which has in_channels.
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnets.append(ResnetBlock(x_channels + skip_channels, out_channels, **resnet_kwargs))
        self.resnets = nn.ModuleList(resnets)
        if with_attention:
            self.attentions = nn.ModuleList(AttentionBlock(out_channels, **attention_kwargs) for _ in range(num_layers))
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if add_upsample else None

    def forward(self, x, skips, temb_act):
        """Get the level's output, consuming its skip activations from the end of `skips`."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb_act)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


def _is_int(value) -> bool:
    """Whether value is an int (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _unsupported(key, value, supported):
    """Get the one-line error for a config value we do not implement."""
    return ValueError(f"UNet config {key}={value!r} is not supported; supported: {supported}")


class UNet(nn.Module, ConfigMixin):
    """The DDPM denoiser: UNet2DModel's architecture and parameter names, our implementation.

    Takes UNet2DModel's config keys with its defaults; the options diffusers' DDPM models use are implemented and
    anything else raises ValueError at construction. Called as `model(sample, timestep)`, it returns an object
    with `.sample`, as UNet2DModel does, so DDPMPipeline and the trainer use it unchanged.
    """

    config_name = CONFIG_NAME

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[Union[int, tuple]] = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: Optional[int] = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: Optional[str] = "UNetMidBlock2D",
        up_block_types: tuple = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: Optional[int] = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: Optional[int] = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: Optional[str] = None,
        num_class_embeds: Optional[int] = None,
        num_train_timesteps: Optional[int] = None,  # accepted and unused, as in UNet2DModel for these options
    ):
        super().__init__()
        check_unet_config(dict(self.config))
        self._reference_mode = False
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepMLP(block_out_channels[0], time_embed_dim)

        resnet_kwargs = dict(temb_channels=time_embed_dim, groups=norm_num_groups, eps=norm_eps, dropout=dropout,
                             time_scale_shift=resnet_time_scale_shift)

        def attention_kwargs(channels, norm_groups):
            return dict(head_dim=attention_head_dim or channels, norm_groups=norm_groups, eps=norm_eps)

        levels = len(block_out_channels)
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = block_out_channels[max(i - 1, 0)], block_out_channels[i]
            self.down_blocks.append(DownBlock(
                in_ch, out_ch, layers_per_block, block_type == "AttnDownBlock2D", i < levels - 1, resnet_kwargs,
                attention_kwargs(out_ch, norm_num_groups), downsample_padding))

        self.mid_block = None
        if mid_block_type is not None:
            mid_channels = block_out_channels[-1]
            # UNet2DModel's bottleneck attention normalises only with the "default" time conditioning, unless told.
            mid_attn_groups = attn_norm_num_groups
            if mid_attn_groups is None and resnet_time_scale_shift == "default":
                mid_attn_groups = norm_num_groups
            mid_resnet_kwargs = dict(resnet_kwargs, output_scale_factor=mid_block_scale_factor)
            mid_attention_kwargs = dict(attention_kwargs(mid_channels, mid_attn_groups),
                                        output_scale_factor=mid_block_scale_factor)
            self.mid_block = MidBlock(mid_channels, mid_resnet_kwargs, mid_attention_kwargs, add_attention)

        reversed_channels = list(reversed(block_out_channels))
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(up_block_types):
            prev_ch, out_ch = reversed_channels[max(i - 1, 0)], reversed_channels[i]
            in_ch = reversed_channels[min(i + 1, levels - 1)]
            self.up_blocks.append(UpBlock(
                in_ch, prev_ch, out_ch, layers_per_block + 1, block_type == "AttnUpBlock2D", i < levels - 1,
                resnet_kwargs, attention_kwargs(out_ch, norm_num_groups)))

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    @property
    def reference_mode(self) -> bool:
        """Whether the network runs UNet2DModel's kernels in UNet2DModel's order (see the module docstring)."""
        return self._reference_mode

    @reference_mode.setter
    def reference_mode(self, value: bool) -> None:
        # Not config: it says how to run, not what the network is, and it changes no result beyond float rounding.
        self._reference_mode = bool(value)
        for module in self.modules():
            if isinstance(module, (ResnetBlock, AttentionBlock, Upsample)):
                module.reference_mode = self._reference_mode

    @property
    def dtype(self) -> torch.dtype:
        """Get the dtype of the parameters."""
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        """Get the device of the parameters."""
        return self.conv_in.weight.device

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        """Get the predicted noise (N, out_channels, H, W) for a noisy sample (N, in_channels, H, W) at timestep."""
        self._check_sample(sample)
        if class_labels is not None:
            raise ValueError("class_labels given, but this UNet has no class embedding (class_embed_type=None)")
        config = self.config
        if config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = timesteps_for_batch(timestep, sample.shape[0], sample.device)
        t_emb = timestep_embedding(timesteps, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
        # Every resnet block takes SiLU of the embedding; computing it once here is the same arithmetic.
        temb_act = fresh_silu(self.time_embedding(t_emb.to(self.dtype)))

        if not self.reference_mode:
            # A fresh NHWC copy of the (small) input: with one channel .contiguous(channels_last) would keep NCHW
            # strides, and the first convolution, and everything after it, would run NCHW.
            sample = torch.empty_like(sample, memory_format=torch.channels_last).copy_(sample)
        else:
            sample = sample.contiguous()
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb_act)
            skips.extend(block_skips)
        if self.mid_block is not None:
            x = self.mid_block(x, temb_act)
        for block in self.up_blocks:
            x = block(x, skips, temb_act)
        x = self.conv_out(fresh_silu(self.conv_norm_out(x)))
        x = x.contiguous()  # hand back the usual NCHW layout
        return UNetOutput(sample=x) if return_dict else (x,)

    def _check_sample(self, sample):
        """Raise a one-line ValueError unless sample is (N, in_channels, H, W) with H, W divisible by the levels."""
        if not torch.is_tensor(sample) or sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            shape = tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__
            raise ValueError(f"sample must be a tensor (N, {self.config.in_channels}, H, W), got {shape}")
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(f"sample height and width must be multiples of {factor} for "
                             f"{len(self.config.block_out_channels)} levels, got {tuple(sample.shape[2:])}")

    # ---- conversion and files -------------------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, unet2d) -> "UNet":
        """Get our UNet with the config, weights, dtype, device and train/eval mode of a diffusers UNet2DModel."""
        model = cls(**public_config(unet2d.config))
        model.to(device=unet2d.device, dtype=unet2d.dtype)
        load_strict(model, unet2d.state_dict())
        return model.train(unet2d.training)

    def to_diffusers(self):
        """Get a diffusers UNet2DModel with this model's config, weights, dtype, device and train/eval mode."""
        from diffusers import UNet2DModel

        unet2d = UNet2DModel(**public_config(self.config)).to(self.device)
        if self.dtype != unet2d.dtype:  # diffusers warns on any dtype argument to .to(), even a no-op one
            unet2d.to(self.dtype)
        load_strict(unet2d, self.state_dict())
        return unet2d.train(self.training)

    def save_pretrained(self, save_directory) -> None:
        """Write a diffusers unet folder (config.json + safetensors weights) that UNet2DModel.from_pretrained reads."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "UNet2DModel", **public_config(self.config)}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory, subfolder=None, torch_dtype=None) -> "UNet":
        """Read a diffusers unet folder (or a pipeline folder with subfolder="unet"); every tensor must fit exactly."""
        folder = Path(directory) / subfolder if subfolder else Path(directory)
        if not folder.is_dir():
            raise FileNotFoundError(f"no such U-Net directory: {folder}")
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                hint = " (a pipeline folder? pass subfolder='unet')" if (folder / "unet").is_dir() else ""
                raise FileNotFoundError(f"{path} is missing{hint}; a U-Net folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        config = json.loads(config_path.read_text())
        class_name = config.get("_class_name", "UNet2DModel")
        if class_name not in CLASS_NAMES:
            raise ValueError(f"{config_path} describes a {class_name}; expected one of {', '.join(CLASS_NAMES)}")
        unknown = sorted(set(public_config(config)) - set(inspect.signature(cls.__init__).parameters))
        if unknown:
            raise ValueError(f"{config_path} has keys UNet2DModel does not take: {', '.join(unknown)}")
        state_dict = load_file(str(weights_path))
        model = cls(**public_config(config))
        if torch_dtype is None:
            # Keep the dtype the weights were saved in, as long as they agree on one.
            dtypes = {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()}
            torch_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        model.to(torch_dtype)
        load_strict(model, state_dict)
        return model.eval()


def public_config(config) -> dict:
    """Get the constructor arguments of a config: every key but the private ones (`_class_name`, ...)."""
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def load_strict(model: nn.Module, state_dict) -> None:
    """Load state_dict into model, raising a one-line ValueError on missing, unexpected or wrongly shaped tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(f"{key} {tuple(state_dict[key].shape)} != {tuple(expected[key].shape)}"
                         for key in set(expected) & set(state_dict) if state_dict[key].shape != expected[key].shape)
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
    if problems:
        raise ValueError(f"state dict does not fit {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state_dict, strict=True)


def check_unet_kwargs(kwargs: dict) -> dict:
    """Get the full U-Net config (defaults filled in) for constructor keywords, or raise a one-line ValueError.

    Checks what the constructor would otherwise fail on with a TypeError: a non-mapping, unknown keys, wrong types.
    """
    if not isinstance(kwargs, dict):
        raise ValueError(f"the UNet config must be a mapping of UNet2DModel keys to values, got {kwargs!r}")
    parameters = inspect.signature(UNet.__init__).parameters
    valid = [name for name in parameters if name != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown UNet config key(s) {unknown}; valid keys: {', '.join(valid)}")
    config = {name: parameters[name].default for name in valid}
    config.update(kwargs)
    check_unet_config(config)
    return config


def check_unet_config(config: dict) -> None:
    """Raise a one-line ValueError naming the key, the value and what is supported, for a config we cannot build."""
    if config["time_embedding_type"] != "positional":
        raise _unsupported("time_embedding_type", config["time_embedding_type"], "positional")
    for key in ("class_embed_type", "num_class_embeds"):
        if config[key] is not None:
            raise _unsupported(key, config[key], "None (no class conditioning)")
    for key, value in (("downsample_type", config["downsample_type"]), ("upsample_type", config["upsample_type"])):
        if value != "conv":
            raise _unsupported(key, value, "conv")
    if config["mid_block_type"] not in MID_BLOCK_TYPES:
        raise _unsupported("mid_block_type", config["mid_block_type"], "UNetMidBlock2D, None")
    if config["act_fn"] not in ACTIVATIONS:
        raise _unsupported("act_fn", config["act_fn"], ", ".join(ACTIVATIONS))
    if config["resnet_time_scale_shift"] not in TIME_SCALE_SHIFTS:
        raise _unsupported("resnet_time_scale_shift", config["resnet_time_scale_shift"], ", ".join(TIME_SCALE_SHIFTS))
    if config["downsample_padding"] not in (0, 1):
        raise _unsupported("downsample_padding", config["downsample_padding"], "0, 1")

    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if not isinstance(config[key], (list, tuple)):
            raise _unsupported(key, config[key], "a list with one entry per level")
    channels = tuple(config["block_out_channels"])
    down, up = tuple(config["down_block_types"]), tuple(config["up_block_types"])
    if not channels or any(not _is_int(c) or c < 1 for c in channels):
        raise _unsupported("block_out_channels", channels, "a non-empty sequence of positive ints")
    for key, types, allowed in (("down_block_types", down, DOWN_BLOCK_TYPES), ("up_block_types", up, UP_BLOCK_TYPES)):
        if len(types) != len(channels):
            raise ValueError(f"UNet config block_out_channels={channels!r} has {len(channels)} levels but {key} has "
                             f"{len(types)}; they need one entry per level")
        for i, block_type in enumerate(types):
            if block_type not in allowed:
                raise _unsupported(f"{key}[{i}]", block_type, ", ".join(allowed))
    for key in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
        if not _is_int(config[key]) or config[key] < 1:
            raise _unsupported(key, config[key], "a positive int")
    for key in ("norm_eps", "mid_block_scale_factor", "dropout"):
        if isinstance(config[key], bool) or not isinstance(config[key], (int, float)) or not math.isfinite(config[key]):
            raise _unsupported(key, config[key], "a finite number")
    if not config["norm_eps"] > 0:
        raise _unsupported("norm_eps", config["norm_eps"], "a positive number")
    if not _is_int(config["freq_shift"]):
        raise _unsupported("freq_shift", config["freq_shift"], "an int")
    if any(c % config["norm_num_groups"] for c in channels):
        raise _unsupported("norm_num_groups", config["norm_num_groups"],
                           f"an int dividing every block_out_channels {channels}")
    attn_groups = config["attn_norm_num_groups"]
    if attn_groups is not None and (not _is_int(attn_groups) or attn_groups < 1 or channels[-1] % attn_groups):
        raise _unsupported("attn_norm_num_groups", attn_groups, f"None or an int dividing {channels[-1]}")
    head_dim = config["attention_head_dim"]
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
        raise _unsupported("attention_head_dim", head_dim, "None (one head) or a positive int")
    if channels[0] // 2 == config["freq_shift"]:
        # The sinusoid's frequencies divide by (width / 2 - freq_shift); diffusers silently returns NaN here.
        raise _unsupported("freq_shift", config["freq_shift"], f"any value but block_out_channels[0] // 2 = "
                                                               f"{channels[0] // 2}")
    if not 0 <= config["dropout"] < 1:
        raise _unsupported("dropout", config["dropout"], "a probability in [0, 1)")
    if config["time_embedding_dim"] is not None and (not isinstance(config["time_embedding_dim"], int)
                                                     or config["time_embedding_dim"] < 1):
        raise _unsupported("time_embedding_dim", config["time_embedding_dim"], "None or a positive int")

    sample_size = config["sample_size"]
    factor = 2 ** (len(channels) - 1)
    sizes = [] if sample_size is None else [sample_size] if isinstance(sample_size, int) else list(sample_size)
    if len(sizes) not in (0, 1, 2) or any(not isinstance(s, int) or s < 1 or s % factor for s in sizes):
        raise _unsupported("sample_size", sample_size,
                           f"None, or an int or (height, width) of positive multiples of 2**(levels-1) = {factor}")
