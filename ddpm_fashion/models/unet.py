"""Our own U-Net: the network of diffusers' UNet2DModel, assembled from the blocks in unet_blocks.py.

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

Files are diffusers' unet folder layout (config.json + diffusion_pytorch_model.safetensors); loading is strict.
"""

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from safetensors.torch import load_file, save_file
from torch import nn

from ddpm_fashion.models.unet_blocks import (
    AttentionBlock,
    DownBlock,
    MidBlock,
    ResnetBlock,
    TimestepMLP,
    UpBlock,
    Upsample,
    fresh_silu,
    timestep_embedding,
    timesteps_for_batch,
)
from ddpm_fashion.models.unet_config import check_unet_config

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
# A config.json written by either class describes the same network.
CONFIG_CLASS_NAMES = ("UNet2DModel", "UNet")


@dataclass
class UNetOutput(BaseOutput):
    """The denoiser's prediction, shaped like its input; `.sample` or `[0]`, as diffusers' UNet2DOutput."""

    sample: torch.Tensor


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
                raise FileNotFoundError(f"{path} is missing{hint}; a U-Net folder holds {CONFIG_NAME} and "
                                        f"{WEIGHTS_NAME}")
        config = json.loads(config_path.read_text())
        class_name = config.get("_class_name", "UNet2DModel")
        if class_name not in CONFIG_CLASS_NAMES:
            raise ValueError(f"{config_path} describes a {class_name}; expected one of {', '.join(CONFIG_CLASS_NAMES)}")
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
