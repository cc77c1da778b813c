"""The U-Net's building blocks: time embedding, resnet block, attention block, down/upsampler and the level blocks.

Each mirrors the diffusers block of the same job, with UNet2DModel's parameter names and shapes, and runs the same
arithmetic in the layouts unet.py's docstring explains (channels-last by default, UNet2DModel's in reference mode).
The level blocks carry diffusers' class names (DownBlock2D, AttnDownBlock2D, UNetMidBlock2D, UpBlock2D, AttnUpBlock2D):
diffusers' tests and tools find the blocks that checkpoint gradients by those names.
"""

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn


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


def attention(q, k, v):
    """Get softmax(q k^T / sqrt(d)) v; on the CPU in float32 even under bf16/fp16 autocast.

    PyTorch's CPU flash-attention kernel is several times slower in bf16 than in float32 for these small heads
    (head_dim 8: 4x in the backward pass, measured on a 2-core AMX Xeon), so under CPU autocast the attention alone
    keeps float32 while the convolutions and projections take bf16. On GPUs the low-precision kernels are the fast ones.
    """
    if q.device.type == "cpu" and q.dtype != torch.float32 and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


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
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels
                              else None)
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
        # UNet2DModel's rule: as many whole heads of head_dim as fit in the channels. When head_dim does not divide
        # them, the heads span a narrower inner width (heads * head_dim) that to_out projects back from.
        self.heads, self.head_dim = channels // head_dim, head_dim
        if self.heads < 1:
            raise ValueError(f"attention_head_dim={head_dim} is wider than the {channels} channels of an attention "
                             f"block: no head fits")
        inner = self.heads * head_dim
        self.output_scale_factor = output_scale_factor
        self.group_norm = nn.GroupNorm(norm_groups, channels, eps=eps) if norm_groups is not None else None
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels)])  # a list only for UNet2DModel's key `to_out.0`
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
        qkv = F.linear(tokens, weight, bias).view(n, height * width, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, HW, head_dim)
        attended = attention(q, k, v)  # (N, heads, HW, head_dim)
        inner = self.heads * self.head_dim
        attended = self.to_out[0](attended.transpose(1, 2).reshape(n, height * width, inner))  # (N, HW, C)
        out = attended.view(n, height, width, c).permute(0, 3, 1, 2) + x  # (N, C, H, W), channels-last again
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor

    def _reference_forward(self, x):
        """UNet2DModel's attention (diffusers' AttnProcessor2_0) op for op, so that it rounds the same."""
        n, c, height, width = x.shape
        tokens = x.view(n, c, height * width).transpose(1, 2)  # (N, HW, C), whatever x's layout
        if self.group_norm is not None:
            tokens = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2)  # normalised over the (N, C, HW) view
        q, k, v = (projection(tokens).view(n, -1, self.heads, self.head_dim).transpose(1, 2)
                   for projection in (self.to_q, self.to_k, self.to_v))  # each (N, heads, HW, head_dim)
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = self.to_out[0](attended.transpose(1, 2).reshape(n, -1, self.heads * self.head_dim))  # (N, HW, C)
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
        # Sum the taps at the weights' own precision (the meta device of memory measurements has no autocast).
        no_autocast = torch.autocast(weight.device.type, enabled=False) if torch.amp.is_autocast_available(
            weight.device.type) else nullcontext()
        with no_autocast:
            taps = self.tap_sums.to(weight.dtype)
            kernel = torch.einsum("pu,qv,oiuv->iopq", taps, taps, weight)  # (C_in, C_out, 4, 4)
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)


class CheckpointedBlock(nn.Module):
    """A U-Net level whose resnet blocks can recompute their activations in the backward pass instead of storing them.

    diffusers' ModelMixin.enable_gradient_checkpointing() sets `gradient_checkpointing` and
    `_gradient_checkpointing_func` on every module that has the attribute, as in UNet2DModel's blocks; like them,
    only the resnet blocks are checkpointed (they hold most of the activations).
    """

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None

    def run_resnet(self, resnet, x, temb_act):
        """Get resnet(x, temb_act), checkpointed when enabled and autograd is recording."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(resnet, x, temb_act)
        return resnet(x, temb_act)


class DownBlock2D(CheckpointedBlock):
    """One encoder level: resnet blocks (each followed by attention in AttnDownBlock2D), then a downsampler."""

    with_attention = False

    def __init__(self, in_channels, out_channels, num_layers, add_downsample, resnet_kwargs, attention_kwargs,
                 downsample_padding):
        super().__init__()
        # Built in UNet2DModel's order (resnet, then its attention, layer by layer), so that under the same seed
        # the random initial weights are UNet2DModel's.
        resnets, attentions = nn.ModuleList(), nn.ModuleList()
        for i in range(num_layers):
            resnets.append(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, **resnet_kwargs))
            if self.with_attention:
                attentions.append(AttentionBlock(out_channels, **attention_kwargs))
        # Registered in UNet2DModel's order too, so that state_dict() lists the tensors as UNet2DModel's does.
        self.attentions = attentions if self.with_attention else None
        self.resnets = resnets
        self.downsamplers = nn.ModuleList([Downsample(out_channels, downsample_padding)]) if add_downsample else None

    def forward(self, x, temb_act):
        """Get the level's output and the activations it hands to the decoder's skip connections."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self.run_resnet(resnet, x, temb_act)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class AttnDownBlock2D(DownBlock2D):
    """DownBlock2D with self-attention after every resnet block."""

    with_attention = True


class UNetMidBlock2D(CheckpointedBlock):
    """The bottleneck: a resnet block, then (attention, resnet block)."""

    def __init__(self, channels, resnet_kwargs, attention_kwargs, add_attention):
        super().__init__()
        # UNet2DModel's construction order (see DownBlock2D): resnet, attention, resnet.
        resnets = nn.ModuleList([ResnetBlock(channels, channels, **resnet_kwargs)])
        attentions = nn.ModuleList([AttentionBlock(channels, **attention_kwargs)]) if add_attention else None
        resnets.append(ResnetBlock(channels, channels, **resnet_kwargs))
        self.attentions = attentions
        self.resnets = resnets

    def forward(self, x, temb_act):
        """Get the bottleneck's output."""
        x = self.run_resnet(self.resnets[0], x, temb_act)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.run_resnet(self.resnets[1], x, temb_act)


class UpBlock2D(CheckpointedBlock):
    """One decoder level: resnet blocks on [x, skip] (each then attention in AttnUpBlock2D), then an upsampler."""

    with_attention = False

    def __init__(self, in_channels, prev_output_channels, out_channels, num_layers, add_upsample, resnet_kwargs,
                 attention_kwargs):
        super().__init__()
        resnets, attentions = nn.ModuleList(), nn.ModuleList()  # in UNet2DModel's order, see DownBlock2D
        for i in range(num_layers):
            x_channels = prev_output_channels if i == 0 else out_channels
            # The last skip of a level comes from the encoder level below it, which has in_channels.
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnets.append(ResnetBlock(x_channels + skip_channels, out_channels, **resnet_kwargs))
            if self.with_attention:
                attentions.append(AttentionBlock(out_channels, **attention_kwargs))
        # Registered in UNet2DModel's order too, so that state_dict() lists the tensors as UNet2DModel's does.
        self.attentions = attentions if self.with_attention else None
        self.resnets = resnets
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if add_upsample else None

    def forward(self, x, skips, temb_act):
        """Get the level's output, consuming its skip activations from the end of `skips`."""
        for i, resnet in enumerate(self.resnets):
            x = self.run_resnet(resnet, torch.cat([x, skips.pop()], dim=1), temb_act)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class AttnUpBlock2D(UpBlock2D):
    """UpBlock2D with self-attention after every resnet block."""

    with_attention = True


# The level blocks by the names config files use for them.
DOWN_BLOCKS = {cls.__name__: cls for cls in (DownBlock2D, AttnDownBlock2D)}
UP_BLOCKS = {cls.__name__: cls for cls in (UpBlock2D, AttnUpBlock2D)}
