"""How our U-Net's files are checked: strict tensor names and shapes, the saved dtype, and one-line folder errors.

Reading and writing the files (safetensors or pickle, variants, shards, the Hub, dtypes, devices) is diffusers'
ModelMixin's job; what is ours is that loading is strict. UNet2DModel only warns about a missing or unexpected tensor
(and fills missing ones randomly); ours refuses, naming every tensor that does not fit, before any is loaded.
"""

import os
import re
from pathlib import Path

import torch
from diffusers.models.model_loading_utils import load_state_dict
from safetensors import safe_open

CONFIG_NAME = "config.json"
# A config.json written by either class describes the same network; ours writes UNet2DModel's name.
CONFIG_CLASS_NAMES = ("UNet2DModel", "UNet")
# safetensors' names of the floating-point dtypes a U-Net is saved in.
_SAFETENSORS_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                             "BF16": torch.bfloat16}
# What the Hub accepts as a repository id ("name" or "owner/name"); anything else is a local path.
_HUB_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def public_config(config) -> dict:
    """Get the constructor arguments of a config: every key but the private ones (`_class_name`, ...)."""
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def state_dict_problems(expected_shapes: dict, found_shapes: dict) -> str:
    """Get what keeps tensors of found_shapes from loading into a model with expected_shapes ('' when nothing).

    Both map tensor names to shapes; the answer lists the missing, unexpected and wrongly shaped tensors by name.
    """
    missing = sorted(set(expected_shapes) - set(found_shapes))
    unexpected = sorted(set(found_shapes) - set(expected_shapes))
    wrong_shape = sorted(f"{key} {tuple(found_shapes[key])} != {tuple(expected_shapes[key])}"
                         for key in set(expected_shapes) & set(found_shapes)
                         if tuple(found_shapes[key]) != tuple(expected_shapes[key]))
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
    return "; ".join(problems)


def load_strict(model: torch.nn.Module, state_dict) -> None:
    """Load state_dict into model, raising a one-line ValueError on missing, unexpected or wrongly shaped tensors."""
    problems = state_dict_problems({k: v.shape for k, v in model.state_dict().items()},
                                   {k: v.shape for k, v in state_dict.items()})
    if problems:
        raise ValueError(f"state dict does not fit {type(model).__name__}: {problems}")
    model.load_state_dict(state_dict, strict=True)


def saved_tensor_specs(state_dict_or_files) -> dict:
    """Get {name: (shape, dtype)} of saved weights: a loaded state dict, or the files of a (sharded) checkpoint.

    safetensors files are read from their headers only; pickle files through diffusers' own loader (weights_only,
    onto the meta device, so no data is read twice). A dtype is None where it is not floating point.
    """
    if isinstance(state_dict_or_files, dict):
        return {name: (tuple(t.shape), t.dtype if t.is_floating_point() else None)
                for name, t in state_dict_or_files.items()}
    specs = {}
    for file in state_dict_or_files:
        if str(file).endswith(".safetensors"):
            with safe_open(str(file), framework="pt") as opened:
                for name in opened.keys():
                    tensor = opened.get_slice(name)
                    specs[name] = (tuple(tensor.get_shape()), _SAFETENSORS_FLOAT_DTYPES.get(tensor.get_dtype()))
        else:
            specs.update(saved_tensor_specs(load_state_dict(str(file), map_location="meta")))
    return specs


def check_config(config: dict, init_keys, where: str) -> None:
    """Raise a one-line ValueError unless config (a config.json's contents) describes a UNet2DModel we take.

    diffusers would drop the keys of another model's config silently and build something else; we say so instead.
    """
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name not in CONFIG_CLASS_NAMES:
        raise ValueError(f"{where} describes a {class_name}; expected one of {', '.join(CONFIG_CLASS_NAMES)}")
    unknown = sorted(set(public_config(config)) - set(init_keys))
    if unknown:
        raise ValueError(f"{where} has keys UNet2DModel does not take: {', '.join(unknown)}")


def check_local_folder(path, subfolder=None) -> None:
    """Raise a one-line FileNotFoundError for a local U-Net folder that is absent or has no config.json.

    A string shaped like a Hub repository id that is no local folder is left to diffusers, which fetches it.
    """
    folder = Path(path) / subfolder if subfolder else Path(path)
    if not folder.is_dir():
        if not Path(path).exists() and _HUB_REPO_ID.match(str(path)) and not os.path.isabs(path):
            return
        raise FileNotFoundError(f"no such U-Net directory: {folder}")
    if not (folder / CONFIG_NAME).is_file():
        hint = " (a pipeline folder? pass subfolder='unet')" if (folder / "unet").is_dir() else ""
        raise FileNotFoundError(f"{folder / CONFIG_NAME} is missing{hint}; a U-Net folder holds {CONFIG_NAME} and "
                                f"the weights")
