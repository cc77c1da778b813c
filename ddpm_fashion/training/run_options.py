"""The options of diffusers' train_unconditional.py that say how to run, not what to train: they are not TrainConfig
keys, so train_config.yaml never holds them (the Hub token least of all). The trainer checks them all before
anything is read or written. The table of every flag of the example and ours: docs/training.md.
"""

import argparse
from pathlib import Path

from ddpm_fashion.guards.inputs import one_line
from ddpm_fashion.training import hub, trackers

# Every run option (besides --config), for error messages that list the valid options.
RUN_OPTIONS = ("--dry_run", "--overwrite_output_dir", "--model_config_name_or_path", "--push_to_hub",
               "--hub_model_id", "--hub_token", "--hub_private_repo", "--enable_xformers_memory_efficient_attention",
               "--local_rank", "--preserve_input_precision")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Add the example's run options to the parser that reads --config and --dry_run."""
    parser.add_argument("--model_config_name_or_path", default=None)
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None)
    parser.add_argument("--hub_token", default=None)
    parser.add_argument("--hub_private_repo", action="store_true")
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    # torch.distributed.launch passes --local-rank (--local_rank before torch 2.0) and sets LOCAL_RANK, which is
    # what Accelerate reads; the example's value is never used either.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1)
    parser.add_argument("--preserve_input_precision", action="store_true")


def load_model_config(name_or_path: str) -> dict:
    """Get the UNet2DModel keys of --model_config_name_or_path: a config.json, a folder holding one (a saved
    UNet2DModel) or a pipeline folder with unet/config.json, or a Hub id (from the cache when offline), read with
    UNet2DModel.load_config as the example does. Anything else is a one-line ValueError."""
    from diffusers import UNet2DModel

    folder = Path(name_or_path)
    subfolder = "unet" if folder.is_dir() and not (folder / "config.json").is_file() and (
        folder / "unet" / "config.json").is_file() else None
    try:
        loaded = UNet2DModel.load_config(name_or_path, subfolder=subfolder)
    except Exception as error:  # diffusers raises OSError, ValueError or JSON errors, each many lines long
        raise ValueError(f"--model_config_name_or_path {name_or_path}: no UNet2DModel config could be read "
                         f"({one_line(error)[:300]})") from None
    if not isinstance(loaded, dict) or loaded.get("_class_name", "UNet2DModel") != "UNet2DModel":
        found = loaded.get("_class_name") if isinstance(loaded, dict) else type(loaded).__name__
        raise ValueError(f"--model_config_name_or_path {name_or_path} is a {found} config, not a UNet2DModel one")
    return {key: value for key, value in loaded.items() if not key.startswith("_")}


def check_xformers(config, options) -> None:
    """The example enables xformers' attention, or refuses without the package; our U-Net has no xformers path (its
    attention is PyTorch's scaled_dot_product_attention, which picks a memory-efficient kernel itself)."""
    if not options.enable_xformers_memory_efficient_attention:
        return
    from diffusers.utils.import_utils import is_xformers_available

    if not is_xformers_available():
        raise ValueError("--enable_xformers_memory_efficient_attention needs the xformers package, which is not "
                         "installed (the example refuses the same way); drop the flag")
    if config.unet_impl != "diffusers":
        raise ValueError("--enable_xformers_memory_efficient_attention works with --unet_impl diffusers only: our "
                         "U-Net runs PyTorch's scaled_dot_product_attention, memory-efficient already")


def check_run_options(config, options):
    """Refuse, in one line, a run option this run cannot honour; get the Hub target of --push_to_hub (or None).
    Runs before anything is read or written."""
    trackers.check_logger(config.logger)
    if options.preserve_input_precision:
        raise ValueError("--preserve_input_precision is not supported: images train as 8-bit grey or RGB (FashionMNIST "
                         "is 8-bit; an image folder's 16/32-bit images are read as 8-bit, as the example does without "
                         "the flag); drop the flag")
    check_xformers(config, options)
    if not options.push_to_hub:
        for name in ("hub_model_id", "hub_token"):
            if getattr(options, name) is not None:
                raise ValueError(f"--{name} is only used with --push_to_hub; add it or drop --{name}")
        if options.hub_private_repo:
            raise ValueError("--hub_private_repo is only used with --push_to_hub; add it or drop --hub_private_repo")
        return None
    return hub.resolve_target(config.output_dir, options.hub_model_id, options.hub_token, options.hub_private_repo,
                              config.logger)


def speed_and_memory_options(model, config, options) -> None:
    """--gradient_checkpointing (ModelMixin's enable_gradient_checkpointing, on either U-Net) and xformers."""
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if options.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()

