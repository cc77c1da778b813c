"""The training configuration: one typed dataclass, read from a YAML file in configs/ plus command-line overrides.

The config says *what* to train; how to run it (processes, GPUs, precision backend) is the launcher's business
(`accelerate launch`, `torchrun`). Precedence: dataclass defaults < YAML file < command line. Every value is
type-checked, unknown keys are errors that list the valid ones, and the resolved config is saved with every run.
"""

import argparse
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml
from transformers import HfArgumentParser

from ddpm_fashion.guards.inputs import MAX_SEED, check_finite, check_int
from ddpm_fashion.models.unet import check_unet_kwargs
from ddpm_fashion.training.run_options import RUN_OPTIONS, add_run_options, load_model_config

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "fashion_mnist.yaml"
CPU_CONFIG = CONFIG_DIR / "cpu.yaml"
# What a checkpoint's weights, optimizer state and batch order were made for: a resumed run must keep these, and its
# global batch (processes x train_batch_size; the trainer checks that, as the process count may change).
RESUME_FIXED_KEYS = ("unet", "gradient_accumulation_steps", "seed", "random_flip", "use_ema", "ddpm_num_steps",
                     "ddpm_beta_schedule", "prediction_type", "train_data_dir", "dataset_name", "dataset_config_name",
                     "center_crop")
# The U-Net keys that must fit the data: for an image folder or a `datasets` dataset they follow it unless given with
# --unet.KEY (the defaults' and shipped configs' values describe FashionMNIST).
DATA_SHAPE_KEYS = ("sample_size", "in_channels", "out_channels")
UNET_OVERRIDE_PREFIX = "--unet."
# What the float32 recipe may not set: the precision that picks it, itself, and where the run lives.
FLOAT32_FIXED_KEYS = ("mixed_precision", "float32", "output_dir", "resume_from_checkpoint")
# The words YAML reads as null (and Python's None): command-line values are read like YAML, so these give None.
NULL_WORDS = ("null", "Null", "NULL", "~", "None")
# What a value of each field type is, in the words of someone writing a YAML file.
TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}


def default_unet_config() -> dict:
    """The smallest U-Net block that fits the data; configs/ choose the architecture."""
    return {"sample_size": 32, "in_channels": 1, "out_channels": 1}


@dataclass
class TrainConfig:
    """Everything that decides which model is trained. Option names follow diffusers' train_unconditional.py."""

    # Where the run lives: the final DDPMPipeline, train_config.yaml, checkpoints/ and logs/.
    output_dir: str = "out"
    # Data: a folder with the FashionMNIST IDX files (default: Debian package, then the Hub).
    data_dir: Optional[str] = None
    random_flip: bool = True
    # Other data instead (ddpm_fashion/image_datasets.py): an image folder, or a `datasets` name / save_to_disk folder.
    train_data_dir: Optional[str] = None
    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    cache_dir: Optional[str] = None  # the `datasets` cache
    resolution: Optional[int] = None  # null: --unet.sample_size, else the first image's shorter side (rounded up)
    center_crop: bool = False  # else a random crop, drawn from the seed
    dataloader_num_workers: int = 0  # processes that decode images (0: the training process)

    # Optimisation.
    train_batch_size: int = 128
    eval_batch_size: int = 64
    num_epochs: int = 10
    max_train_steps: Optional[int] = None  # overrides num_epochs when set
    # Train for at most this many minutes: once the first 20 steps are timed, the run ends at the step that fits (at
    # most max_train_steps) and the learning-rate schedule is fitted to it, so its decay completes; null: by steps.
    # The steps before the plan train as without it while the warm-up (lr_warmup_steps) covers them.
    max_train_minutes: Optional[float] = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "cosine"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.95
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-6
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # null: the launcher's choice (`accelerate launch --mixed_precision`, `accelerate config`), else "no";
    # auto: bf16 where the device runs it natively, else "no". The run's train_config.yaml records what was used.
    mixed_precision: Optional[Literal["no", "fp16", "bf16", "auto"]] = None
    # Config keys that replace the others where mixed_precision auto picks float32 (the device has no native bf16): a
    # recipe for the slower precision, e.g. a narrower U-Net that sees more images in the same time; its `unet` sets
    # only the U-Net keys it gives. A key given on the command line wins over the file's recipe. null: none.
    float32: Optional[dict] = None

    # Exponential moving average of the weights (diffusers.training_utils.EMAModel with warm-up).
    use_ema: bool = True
    ema_max_decay: float = 0.9999
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75

    # Checkpoints, samples and logging.
    checkpointing_steps: int = 500
    # Also checkpoint once this many minutes passed since the last checkpoint (or the start), so that an interruption
    # loses at most that much on a slow machine whatever the step count; null: by steps only.
    checkpointing_minutes: Optional[float] = None
    checkpoints_total_limit: Optional[int] = 3
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint folder
    save_images_epochs: int = 1
    save_images_steps: Optional[int] = None  # sample every N steps instead of every N epochs
    save_model_epochs: Optional[int] = None  # also publish (and push) the pipeline every N epochs; null: at the end
    # An Accelerate tracker (trackers.TRACKERS) or none; logging_dir is relative to output_dir (or absolute).
    logger: Literal["tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio",
                    "none"] = "tensorboard"
    logging_dir: str = "logs"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, same numbers
    seed: int = 0

    # The diffusion process and the models.
    ddpm_num_steps: int = 1000
    ddpm_num_inference_steps: int = 1000  # steps used for the sample grids
    ddpm_beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear"
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    # The objective (ddpm_fashion/training/objective.py): min-SNR-gamma loss weights (diffusers' name; null =
    # unweighted, as in Ho et al.) and how a batch's timesteps are drawn.
    snr_gamma: Optional[float] = None
    snr_weight_floor: Optional[float] = None  # least weight of a timestep min-SNR caps (SNR > gamma); null = the paper
    timestep_sampling: Literal["uniform", "stratified"] = "uniform"
    unet_impl: Literal["own", "diffusers"] = "own"
    scheduler_impl: Literal["own", "diffusers"] = "own"
    # The UNet2DModel config (same keys and defaults as diffusers); override one key with --unet.KEY VALUE.
    unet: dict = field(default_factory=default_unet_config)

    def __post_init__(self):
        check_types(self)
        check_values(self)


def field_type(name: str) -> tuple:
    """Get a TrainConfig field's type without Optional, and whether it is Optional."""
    expected = typing.get_type_hints(TrainConfig)[name]
    if typing.get_origin(expected) is typing.Union:  # Optional[X]
        return next(a for a in typing.get_args(expected) if a is not type(None)), True
    return expected, False


def checked_value(name: str, value):
    """Get a value as its field's type holds it (an int for a float field becomes a float), or raise a one-line
    ValueError naming the field and what it allows."""
    expected, optional = field_type(name)
    if value is None and optional:
        return None
    if typing.get_origin(expected) is Literal:
        if value not in typing.get_args(expected):
            raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(typing.get_args(expected))}")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # YAML reads 1 as int; 1 is a fine learning rate
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"{name} must be {TYPE_WORDS[expected]}{' or null' if optional else ''}, got {value!r}")
    return value


def check_types(config: TrainConfig) -> None:
    """Reject a value whose type does not match its field (values given to the dataclass bypass argparse)."""
    for f in dataclasses.fields(config):
        setattr(config, f.name, checked_value(f.name, getattr(config, f.name)))


def checked_yaml_value(name: str, value):
    """Get a value YAML read for a field as checked_value does, reading YAML 1.1's dotless exponent as a number."""
    if field_type(name)[0] is float and isinstance(value, str):
        # YAML 1.1 reads an exponent without a dot (1e-4) as a string; argparse's float() always read it.
        try:
            value = float(value)
        except ValueError:
            pass  # refused by checked_value as not a number
    return checked_value(name, value)


def check_file_types(values: dict, path: Path) -> dict:
    """Get a config file's values checked against their fields' types; a wrong one is a one-line ValueError naming
    the file and key (argparse would blame a command-line option the user never gave)."""
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = checked_yaml_value(key, value)
        except ValueError as error:
            raise ValueError(f"config file {path}: {error}") from None
    return checked


def check_values(config: TrainConfig) -> None:
    """Reject values that are well-typed but cannot train (caught before anything is written)."""
    at_least_one = ["train_batch_size", "eval_batch_size", "num_epochs", "gradient_accumulation_steps",
                    "checkpointing_steps", "save_images_epochs", "ddpm_num_steps", "ddpm_num_inference_steps"]
    for name in at_least_one:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in ["max_train_steps", "checkpoints_total_limit", "save_images_steps", "save_model_epochs"]:
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1 (or null), got {getattr(config, name)}")
    for f in dataclasses.fields(config):
        if isinstance(getattr(config, f.name), float):
            check_finite(f.name, getattr(config, f.name))
    check_int("seed", config.seed, 0, MAX_SEED)
    if config.snr_gamma is not None and not config.snr_gamma > 0:
        raise ValueError(f"snr_gamma must be positive (5 in Hang et al. 2023) or null, got {config.snr_gamma}")
    if config.snr_weight_floor is not None and not (config.snr_weight_floor > 0 and config.snr_gamma is not None):
        raise ValueError("snr_weight_floor must be positive, with snr_gamma set, or null; got "
                         f"{config.snr_weight_floor} with snr_gamma {config.snr_gamma}")
    for name in ["learning_rate", "max_grad_norm", "adam_epsilon", "ema_inv_gamma", "ema_power"]:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    for name in ["adam_beta1", "adam_beta2", "ema_max_decay"]:
        if not 0 <= getattr(config, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)}")
    for name in ["checkpointing_minutes", "max_train_minutes"]:
        if getattr(config, name) is not None and not getattr(config, name) > 0:
            raise ValueError(f"{name} must be positive (or null), got {getattr(config, name)}")
    if config.lr_warmup_steps < 0 or config.adam_weight_decay < 0:
        raise ValueError("lr_warmup_steps and adam_weight_decay must not be negative")
    if config.ddpm_num_inference_steps > config.ddpm_num_steps:
        raise ValueError(f"ddpm_num_inference_steps ({config.ddpm_num_inference_steps}) must not exceed "
                         f"ddpm_num_steps ({config.ddpm_num_steps})")
    check_unet_kwargs(config.unet)
    if config.float32 is not None:
        float32_config(config)


def float32_config(config: TrainConfig) -> TrainConfig:
    """Get the config with its float32 recipe applied, checked as any config is, or raise a one-line ValueError."""
    recipe = config.float32
    if unknown := sorted(set(recipe) - set(valid_keys())):
        raise ValueError(f"float32 sets unknown config key(s) {unknown}; it takes the keys a config file does")
    if fixed := sorted(set(recipe) & set(FLOAT32_FIXED_KEYS)):
        raise ValueError(f"float32 may not set {fixed}; it sets what to train (e.g. learning_rate, unet)")
    unet = recipe.get("unet", {})
    if not isinstance(unet, dict):
        raise ValueError(f"float32's unet must be a mapping of UNet2DModel keys to values, got {unet!r}")
    if shape_keys := sorted(set(unet) & set(DATA_SHAPE_KEYS)):
        raise ValueError(f"float32's unet may not set {shape_keys}: they follow the data; it changes the "
                         "architecture only (e.g. block_out_channels)")
    try:
        values = {key: checked_yaml_value(key, value) for key, value in recipe.items() if key != "unet"}
        return dataclasses.replace(config, float32=None, unet={**config.unet, **unet}, **values)
    except ValueError as error:
        raise ValueError(f"float32 {recipe} over the config: {error}") from None


def with_float32(config: TrainConfig, requested_precision) -> bool:
    """Apply the float32 recipe where `auto` picked float32 (config.mixed_precision resolved); get whether it did."""
    if requested_precision != "auto" or config.mixed_precision != "no" or not config.float32:
        return False
    applied = float32_config(config)
    for f in dataclasses.fields(config):
        if f.name != "float32":  # kept, so the run's train_config.yaml says which recipe made these values
            setattr(config, f.name, getattr(applied, f.name))
    return True


def valid_keys() -> list:
    """The keys a YAML config may set."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


class DuplicateKeyError(ValueError):
    """A YAML mapping that gives one key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may be followed by keys of base: overriding them is what merging is for
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:
                continue  # an unhashable key, which SafeLoader refuses with its own error
            if first is not None:
                where = f"lines {first} and {line}" if first != line else f"both on line {line}"
                raise DuplicateKeyError(f"key {key!r} appears twice ({where}); keep one")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """Get the value a YAML text holds (safe_load's types), refusing a mapping that gives one key twice."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def read_yaml(path: Path) -> dict:
    """Read a config file; a missing file, bad YAML, a key given twice or an unknown key is a one-line ValueError."""
    if Path(path).is_dir():
        raise ValueError(f"config file {path} is a directory, not a YAML file; the shipped ones are in {CONFIG_DIR}")
    if not Path(path).is_file():
        raise ValueError(f"config file {path} does not exist; the shipped ones are in {CONFIG_DIR}")
    try:
        values = load_yaml(Path(path).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text; a config is a YAML file like those in {CONFIG_DIR}") \
            from None
    except DuplicateKeyError as error:
        raise ValueError(f"config file {path}: {error}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must be a mapping of keys to values")
    if "float32_unet" in values and "float32" not in values:  # the recipe's first form (U-Net keys only), as saved
        legacy = values.pop("float32_unet")  # by runs of that trainer: read as today's recipe, so they resume
        values["float32"] = {"unet": legacy} if legacy is not None else None
    unknown = sorted(set(values) - set(valid_keys()))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {path}; valid keys: {', '.join(valid_keys())}")
    if "unet" in values and not isinstance(values["unet"], dict):
        raise ValueError(f"unet in config file {path} must be a mapping of UNet2DModel keys to values (e.g. "
                         f"block_out_channels: [32, 64]), got {values['unet']!r}")
    if values.get("float32") is not None and not isinstance(values["float32"], dict):
        raise ValueError(f"float32 in config file {path} must be a mapping of config keys to values (e.g. "
                         f"learning_rate: 1.0e-3), or null; got {values['float32']!r}")
    return values


def split_unet_overrides(argv: list) -> tuple:
    """Separate `--unet.KEY VALUE` pairs (VALUE read as YAML, e.g. `[32, 64]`) from the other arguments."""
    rest, overrides = [], {}
    args = iter(argv)
    for arg in args:
        if not arg.startswith(UNET_OVERRIDE_PREFIX):
            rest.append(arg)
            continue
        key, _, value = arg[len(UNET_OVERRIDE_PREFIX):].partition("=")
        if not value:
            value = next(args, None)
            if value is None:
                raise ValueError(f"{arg} needs a value")
        if not key:
            raise ValueError(f"{arg} names no U-Net key; use --unet.KEY VALUE, e.g. --unet.layers_per_block 2")
        try:
            overrides[key] = load_yaml(value)
        except DuplicateKeyError as error:
            raise ValueError(f"{arg} {value!r}: {error}") from None
        except yaml.YAMLError as error:
            raise ValueError(f"{arg} {value!r} is not a valid YAML value: {str(error).splitlines()[0]}") from None
    return rest, overrides


def valid_options() -> str:
    """The command-line options, for error messages."""
    keys = ", ".join(f"--{k}" for k in valid_keys() if k != "unet")
    return f"--config, {', '.join(RUN_OPTIONS)}, --unet.KEY, {keys}"


def or_null(convert):
    """Get an argparse type that reads a null word (NULL_WORDS) as None and any other text with convert."""

    @functools.wraps(convert)  # keeps convert's name, which argparse's "invalid int value" message shows
    def parse(text):
        return None if text in NULL_WORDS else convert(text)

    return parse


class ChoicesOrNull(tuple):
    """argparse choices that also admit None (a null word read by or_null), without listing it as a choice."""

    def __contains__(self, value):
        return value is None or super().__contains__(value)


def mapping(text: str) -> dict:
    """Read a command-line value as a YAML mapping, e.g. `{block_out_channels: [16, 32, 64]}`."""
    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        raise ValueError(f"{text!r} is not valid YAML") from None
    if not isinstance(value, dict):
        raise ValueError(f"{text!r} is not a YAML mapping")
    return value


class ConfigArgumentParser(HfArgumentParser):
    """HfArgumentParser whose usage errors become ValueErrors, so the launcher prints one line and exits 2, and whose
    Optional fields take `null` (HfArgumentParser gives an Optional[int] field type=int, which refuses it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for action in self._actions:
            if action.dest == "float32":  # `unet` is set key by key (--unet.KEY), never whole
                action.type = mapping  # a YAML mapping, as in a config file (argparse's dict() reads no text)
            if action.dest in valid_keys() and field_type(action.dest)[1] and action.type is not None:
                action.type = or_null(action.type)
                if action.choices is not None:
                    action.choices = ChoicesOrNull(action.choices)

    def error(self, message):
        raise ValueError(f"{message}; valid options: {valid_options()}")


def parse_config(argv: Optional[list] = None, default_config: Path = DEFAULT_CONFIG) -> tuple:
    """Resolve the config from `--config FILE` (default: default_config) and CLI overrides.

    Returns (TrainConfig, run options, config_given), config_given saying whether --config was on the command line.
    The run options say how to run, not what to train, so they are not saved with the config: `dry_run` (print the
    config, train nothing), `overwrite_output_dir` (train a new run over an earlier one in output_dir) and the other
    options of diffusers' train_unconditional.py that say how to run (run_options.py: the Hub token among them).
    """
    launcher = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    launcher.add_argument("--config", default=None)
    launcher.add_argument("--dry_run", "--dry-run", action="store_true")
    launcher.add_argument("--overwrite_output_dir", action="store_true")
    add_run_options(launcher)  # train_unconditional.py's options that say how to run (run_options.py)
    known, rest = launcher.parse_known_args(argv)
    path = Path(known.config or default_config)
    file_values = check_file_types(read_yaml(path), path)
    rest, unet_overrides = split_unet_overrides(rest)

    parser = ConfigArgumentParser(TrainConfig, allow_abbrev=False)
    file_unet = file_values.pop("unet", {})
    if known.model_config_name_or_path is not None:  # a UNet2DModel config replaces the file's unet block
        file_unet = load_model_config(known.model_config_name_or_path)
    unet = {**default_unet_config(), **file_unet, **unet_overrides}
    given = keys_given(rest) | ({"unet"} if unet_overrides or known.model_config_name_or_path is not None else set())
    if file_values.get("float32") and "float32" not in given:  # the command line wins over the file's recipe
        file_values["float32"] = {k: v for k, v in file_values["float32"].items() if k not in given} or None
    parser.set_defaults(**file_values, unet=unet)
    config, unknown = parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False,
                                                         return_remaining_strings=True)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; valid options: {valid_options()}")
    if config.train_data_dir is not None or config.dataset_name is not None:
        config.unet = {k: v for k, v in config.unet.items() if k not in DATA_SHAPE_KEYS or k in unet_overrides}
    return config, known, known.config is not None


def keys_given(argv: list) -> set:
    """Get the config keys a command line sets with `--KEY VALUE` or `--KEY=VALUE` (`--KEY-NAME` too)."""
    names = {arg[2:].partition("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    return names & set(valid_keys())


def config_to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML, loadable again with `--config`."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def with_new_keys_at_defaults(saved: dict) -> dict:
    """Get a saved train_config.yaml's values with each key the trainer gained since at its default: what that run
    trained with, as an older trainer had no other behaviour."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    return {**defaults, **saved}


def resume_differences(saved: dict, config: TrainConfig) -> list:
    """Get 'key: saved -> new' for each RESUME_FIXED_KEYS value that differs from a checkpoint's saved config."""
    differences, saved = [], with_new_keys_at_defaults(saved)  # a key the checkpoint predates had its default
    for key in RESUME_FIXED_KEYS:
        old, new = saved.get(key), getattr(config, key)
        if key == "unet":  # compared with UNet2DModel's defaults filled in: an omitted default is no change
            old, new = check_unet_kwargs(old if isinstance(old, dict) else {}), check_unet_kwargs(new)
            differences += [f"unet.{name}: {old.get(name)!r} -> {new.get(name)!r}"
                            for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        elif old != new:
            differences.append(f"{key}: {old!r} -> {new!r}")
    return differences
