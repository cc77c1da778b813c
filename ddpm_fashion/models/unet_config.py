"""Which UNet2DModel configurations our U-Net builds, checked with one-line errors before any weights are made."""

import math

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", None)
ACTIVATIONS = ("silu", "swish")  # the same function under diffusers' two names
TIME_SCALE_SHIFTS = ("default", "scale_shift")


def _is_int(value) -> bool:
    """Whether value is an int (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _unsupported(key, value, supported):
    """Get the one-line error for a config value we do not implement."""
    return ValueError(f"UNet config {key}={value!r} is not supported; supported: {supported}")


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
    if head_dim is not None and (not _is_int(head_dim) or head_dim < 1):
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

    # Each attention block has channels // head_dim heads (UNet2DModel's rule); with none it could not attend.
    attention_widths = [c for c, kind in zip(channels, down) if kind == "AttnDownBlock2D"]
    attention_widths += [c for c, kind in zip(reversed(channels), up) if kind == "AttnUpBlock2D"]
    if config["mid_block_type"] is not None and config["add_attention"]:
        attention_widths.append(channels[-1])
    if head_dim is not None and attention_widths and head_dim > min(attention_widths):
        raise _unsupported("attention_head_dim", head_dim, f"None (one head) or at most the {min(attention_widths)} "
                                                           f"channels of the narrowest attention block")

    sample_size = config["sample_size"]
    factor = 2 ** (len(channels) - 1)
    sizes = [] if sample_size is None else [sample_size] if isinstance(sample_size, int) else list(sample_size)
    if len(sizes) not in (0, 1, 2) or any(not isinstance(s, int) or s < 1 or s % factor for s in sizes):
        raise _unsupported("sample_size", sample_size,
                           f"None, or an int or (height, width) of positive multiples of 2**(levels-1) = {factor}")
