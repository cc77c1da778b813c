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

The class is a diffusers ModelMixin, so loading and saving (variants, shards, safetensors or weights-only pickle,
the Hub, dtypes, low_cpu_mem_usage), gradient checkpointing and the library's other model hooks are diffusers' own.
What is ours about files (unet_files.py): they are written as UNet2DModel's (config `_class_name` "UNet2DModel"),
loading is strict, and weights keep the dtype they were saved in unless a dtype is asked for.
"""

import inspect
import json
from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ddpm_fashion.models.unet_blocks import (
    DOWN_BLOCKS,
    UP_BLOCKS,
    AttentionBlock,
    ResnetBlock,
    TimestepMLP,
    UNetMidBlock2D,
    Upsample,
    fresh_silu,
    timestep_embedding,
    timesteps_for_batch,
)
from ddpm_fashion.models.unet_config import check_unet_config
from ddpm_fashion.models.unet_files import (  # noqa: F401 (callers import load_strict, public_config from here)
    CONFIG_NAME,
    check_config,
    check_local_folder,
    load_strict,
    public_config,
    saved_tensor_specs,
    state_dict_problems,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass
class UNetOutput(BaseOutput):
    """The denoiser's prediction, shaped like its input; `.sample` or `[0]`, as diffusers' UNet2DOutput."""

    sample: torch.Tensor


class UNet(ModelMixin, ConfigMixin):
    """The DDPM denoiser: UNet2DModel's architecture and parameter names, our implementation.

    Takes UNet2DModel's config keys with its defaults; the options diffusers' DDPM models use are implemented and
    anything else raises ValueError at construction. Called as `model(sample, timestep)`, it returns an object
    with `.sample`, as UNet2DModel does, so DDPMPipeline and the trainer use it unchanged. Under the same seed a new
    UNet draws UNet2DModel's initial weights. `enable_gradient_checkpointing()` (diffusers' ModelMixin) recomputes
    the resnet blocks' activations in the backward pass, as in UNet2DModel.
    """

    config_name = CONFIG_NAME
    _supports_gradient_checkpointing = True

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
        # Registered before the bottleneck, as in UNet2DModel, so that state_dict() lists the tensors in its order;
        # the blocks are still built down, middle, up (the order their random initial weights are drawn in).
        self.down_blocks, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = block_out_channels[max(i - 1, 0)], block_out_channels[i]
            self.down_blocks.append(DOWN_BLOCKS[block_type](
                in_ch, out_ch, layers_per_block, i < levels - 1, resnet_kwargs,
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
            self.mid_block = UNetMidBlock2D(mid_channels, mid_resnet_kwargs, mid_attention_kwargs, add_attention)

        reversed_channels = list(reversed(block_out_channels))
        for i, block_type in enumerate(up_block_types):
            prev_ch, out_ch = reversed_channels[max(i - 1, 0)], reversed_channels[i]
            in_ch = reversed_channels[min(i + 1, levels - 1)]
            self.up_blocks.append(UP_BLOCKS[block_type](
                in_ch, prev_ch, out_ch, layers_per_block + 1, i < levels - 1, resnet_kwargs,
                attention_kwargs(out_ch, norm_num_groups)))

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
        # The dtype of the layer it feeds, read directly: ModelMixin.dtype walks every module (about 1 ms a call).
        temb_act = fresh_silu(self.time_embedding(t_emb.to(self.time_embedding.linear_1.weight.dtype)))

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
        model = cls(**public_config(unet2d.config)).to(unet2d.device)
        if unet2d.dtype != model.dtype:  # diffusers warns on any dtype argument to .to(), even a no-op one
            model.to(unet2d.dtype)
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

    def to_json_string(self) -> str:
        """Get config.json's text, written as UNet2DModel's (plain diffusers and DDPMPipeline load it as theirs)."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = "UNet2DModel"
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Build a UNet from a UNet2DModel (or UNet) config; another model's config or an unknown key is an error."""
        if isinstance(config, dict):
            check_config(config, inspect.signature(cls.__init__).parameters, where="the config")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "UNet":
        """Load a diffusers unet folder or Hub repository (subfolder="unet" in a pipeline), strictly.

        diffusers' ModelMixin.from_pretrained with all its options (variant, torch_dtype or dtype, low_cpu_mem_usage,
        use_safetensors, ...). Ours beyond it: every saved tensor must fit by name and shape (a one-line ValueError
        lists those that do not), and without a dtype the weights keep the one they were saved in.
        """
        check_local_folder(pretrained_model_name_or_path, kwargs.get("subfolder"))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _load_pretrained_model(cls, model, state_dict, resolved_model_file, pretrained_model_name_or_path,
                               loaded_keys, *args, **kwargs):
        """ModelMixin's loading step, after checking that every saved tensor fits (it would only warn)."""
        saved = saved_tensor_specs(state_dict if state_dict is not None else resolved_model_file)
        # A sharded checkpoint's index names its tensors; the shards' shapes and dtypes are read for those.
        saved = {name: saved.get(name, ((), None)) for name in loaded_keys}
        problems = state_dict_problems({name: tensor.shape for name, tensor in model.state_dict().items()},
                                       {name: shape for name, (shape, _) in saved.items()})
        if problems:
            raise ValueError(f"{pretrained_model_name_or_path}: the saved weights do not fit {cls.__name__}: "
                             f"{problems}")
        loaded = super()._load_pretrained_model(model, state_dict, resolved_model_file, pretrained_model_name_or_path,
                                                loaded_keys, *args, **kwargs)
        saved_dtypes = {dtype for _, dtype in saved.values() if dtype is not None}
        if kwargs.get("dtype") is None and len(saved_dtypes) == 1:
            # ModelMixin casts to the float32 the model was built in; casting back to the saved dtype is exact.
            # nn.Module.to: ModelMixin.to warns on any dtype, as if some module had to stay float32 (none does here).
            nn.Module.to(loaded[0], saved_dtypes.pop())
        return loaded


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
