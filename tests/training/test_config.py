"""ddpm_fashion.training.config: what a config file and the command line may say, and the one-line errors when they
are wrong."""

import dataclasses
import typing

import pytest

from ddpm_fashion.training.config import CONFIG_DIR, TrainConfig, parse_config


def write_config(tmp_path, text):
    """Write a config file and return its path."""
    path = tmp_path / "my.yaml"
    path.write_text(text)
    return path


def parse_file(path, *extra):
    """Parse `--config path` plus extra command-line arguments into a TrainConfig."""
    config, _, _ = parse_config(["--config", str(path), *map(str, extra)])
    return config


def optional_keys():
    """The TrainConfig keys whose type is Optional[...]."""
    hints = typing.get_type_hints(TrainConfig)
    return [f.name for f in dataclasses.fields(TrainConfig) if type(None) in typing.get_args(hints[f.name])]


@pytest.mark.parametrize("line, message", [
    ("seed: 1e3", "seed must be an integer, got '1e3'"),  # YAML 1.1 reads 1e3 as a string
    ("max_train_steps: 1.5", "max_train_steps must be an integer or null, got 1.5"),
    ("random_flip: 3", "random_flip must be true or false, got 3"),
    ("output_dir: 5", "output_dir must be a string, got 5"),
    ("logger: tensorbored", "logger='tensorbored' is not allowed; choose one of ['tensorboard', 'wandb', 'comet_ml', "
                            "'mlflow', 'aim', 'clearml', 'dvclive', 'swanlab', 'trackio', 'none']"),
    ("mixed_precision: fp8", "mixed_precision='fp8' is not allowed; choose one of ['no', 'fp16', 'bf16', 'auto']"),
    ("learning_rate: fast", "learning_rate must be a number, got 'fast'"),
])
def test_a_wrongly_typed_file_value_names_the_file_and_key(tmp_path, line, message):
    path = write_config(tmp_path, f"{line}\n")
    with pytest.raises(ValueError) as error:
        parse_file(path)
    assert str(error.value) == f"config file {path}: {message}"


@pytest.mark.parametrize("line, key, value", [
    ("learning_rate: 1e-4", "learning_rate", 0.0001),  # a string in YAML 1.1, a number to anyone reading it
    ("learning_rate: 1", "learning_rate", 1.0),
    ("snr_gamma: 5", "snr_gamma", 5.0),
    ("snr_gamma: null", "snr_gamma", None),
    ("seed: 1000", "seed", 1000),
])
def test_numbers_in_a_file_keep_reading_as_their_keys_type(tmp_path, line, key, value):
    read = getattr(parse_file(write_config(tmp_path, f"{line}\n")), key)
    assert read == value and type(read) is type(value)


def test_a_directory_given_as_config_says_a_yaml_file_is_wanted(tmp_path):
    with pytest.raises(ValueError, match=f"^config file {tmp_path} is a directory, not a YAML file"):
        parse_file(tmp_path)


@pytest.mark.parametrize("text, key, lines", [
    ("learning_rate: 1.0e-3\nseed: 1\nlearning_rate: 2.0e-3\n", "learning_rate", (1, 3)),
    ("seed: 1\nunet:\n  sample_size: 32\n  layers_per_block: 1\n  sample_size: 28\n", "sample_size", (3, 5)),
])
def test_a_key_given_twice_in_a_file_names_the_key_the_file_and_both_lines(tmp_path, text, key, lines):
    path = write_config(tmp_path, text)
    with pytest.raises(ValueError) as error:
        parse_file(path)
    first, second = lines
    assert str(error.value) == f"config file {path}: key '{key}' appears twice (lines {first} and {second}); keep one"


def test_a_yaml_merge_key_is_not_a_key_given_twice(tmp_path):
    path = write_config(tmp_path, "unet:\n  <<: {sample_size: 32, layers_per_block: 2}\n  layers_per_block: 1\n")
    assert parse_file(path).unet["layers_per_block"] == 1


def test_a_key_given_twice_in_a_unet_override_is_refused(tmp_path):
    path = write_config(tmp_path, "seed: 1\n")
    with pytest.raises(ValueError, match=r"^--unet.down_block_types .*key 'a' appears twice"):
        parse_file(path, "--unet.down_block_types", "{a: 1, a: 2}")


@pytest.mark.parametrize("key", optional_keys())
def test_null_on_the_command_line_clears_every_optional_key(tmp_path, key):
    path = write_config(tmp_path, "snr_gamma: 5\nmax_train_steps: 4\nmixed_precision: bf16\ndata_dir: here\n")
    assert getattr(parse_file(path, f"--{key}", "null"), key) is None


@pytest.mark.parametrize("spelling", ["null", "Null", "NULL", "~", "None"])
def test_null_is_read_in_each_spelling_yaml_and_python_use(tmp_path, spelling):
    config = parse_file(write_config(tmp_path, "seed: 1\n"), "--checkpoints_total_limit", spelling)
    assert config.checkpoints_total_limit is None


@pytest.mark.parametrize("extra, message", [
    (["--seed", "null"], "argument --seed: invalid int value: 'null'"),  # seed is not Optional
    (["--mixed_precision", "nul"], r"argument --mixed_precision/--mixed-precision: invalid choice: 'nul' \(choose "
                                   r"from 'no', 'fp16', 'bf16', 'auto'\)"),
    (["--checkpoints_total_limit", "nil"], "argument --checkpoints_total_limit/--checkpoints-total-limit: invalid int "
                                           "value: 'nil'"),
])
def test_null_is_refused_where_the_key_is_not_optional_and_other_words_stay_refused(tmp_path, extra, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        parse_file(write_config(tmp_path, "seed: 1\n"), *extra)


# smoke.yaml's U-Net is (16, 32) and its learning rate 1e-3; 1e-4 is read as YAML 1.1 does (a string), as in a file
FLOAT32 = "float32:\n  learning_rate: 1e-4\n  unet:\n    block_out_channels: [8, 16]\n"


def test_the_float32_recipe_replaces_its_keys_only_where_auto_picked_float32(tmp_path):
    from ddpm_fashion.training.config import with_float32

    path = write_config(tmp_path, (CONFIG_DIR / "smoke.yaml").read_text() + FLOAT32)
    for requested, resolved, applies in [("auto", "no", True), ("auto", "bf16", False), ("no", "no", False),
                                         (None, "no", False), ("bf16", "bf16", False)]:
        config = parse_file(path)
        assert config.float32 == {"learning_rate": "1e-4", "unet": {"block_out_channels": [8, 16]}}
        config.mixed_precision = resolved  # as preflight resolves it
        assert with_float32(config, requested) is applies
        assert config.unet["block_out_channels"] == ([8, 16] if applies else [16, 32])
        assert config.learning_rate == (1e-4 if applies else 1e-3)
        assert config.unet["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]  # the other U-Net keys stay
        assert config.float32 is not None  # kept: the saved config says which recipe made its values


@pytest.mark.parametrize("recipe, message", [
    ("{unet: {block_out_channels: [8, 16, 32]}}",
     r"^float32 \{'unet': \{'block_out_channels': \[8, 16, 32\]\}\} over the config: UNet config "
     r"block_out_channels=\(8, 16, 32\) has 3 levels but down_block_types has 2"),
    ("{unet: {sample_size: 16}}", r"^float32's unet may not set \['sample_size'\]: they follow the data"),
    ("{unet: {no_such_key: 1}}", r"^float32 .* over the config: unknown UNet config key"),
    ("{unet: [8, 16]}", r"^float32's unet must be a mapping of UNet2DModel keys to values, got \[8, 16\]"),
    ("{learning_rate: -1}", r"^float32 \{'learning_rate': -1\} over the config: learning_rate must be positive"),
    ("{learning_rate: fast}", r"^float32 .* over the config: learning_rate must be a number, got 'fast'"),
    ("{no_such_key: 1}", r"^float32 sets unknown config key\(s\) \['no_such_key'\]; it takes the keys a config"),
    ("{mixed_precision: bf16}", r"^float32 may not set \['mixed_precision'\]; it sets what to train"),
    ("{output_dir: elsewhere}", r"^float32 may not set \['output_dir'\]"),
    ("5", r"^argument --float32: invalid mapping value: '5'"),
    ("{x: [}", r"^argument --float32: invalid mapping value: '\{x: \[\}'"),
])
def test_a_float32_recipe_that_cannot_train_is_refused_in_one_line_on_every_machine(tmp_path, recipe, message):
    smoke = (CONFIG_DIR / "smoke.yaml").read_text()
    with pytest.raises(ValueError, match=message):
        parse_file(write_config(tmp_path, smoke), "--float32", recipe)
    if message.startswith("^float32"):  # the same recipe in a config file: the same line
        with pytest.raises(ValueError, match=message):
            parse_file(write_config(tmp_path, smoke + f"float32: {recipe}\n"))


def test_float32_in_a_file_must_be_a_mapping_or_null(tmp_path):
    with pytest.raises(ValueError, match=r"^float32 in config file .* must be a mapping of config keys to values"):
        parse_file(write_config(tmp_path, "float32: [16, 32]\n"))
    assert parse_file(write_config(tmp_path, "float32: null\n")).float32 is None
    assert parse_file(write_config(tmp_path, FLOAT32.replace("[8, 16]", "[8, 16, 32]")), "--float32",
                      "null").float32 is None


def test_a_config_saved_with_the_recipes_first_form_float32_unet_reads_as_the_float32_recipe(tmp_path):
    saved = "float32_unet:\n  block_out_channels: [8, 16]\n"  # what train_config.yaml held while the key existed
    path = write_config(tmp_path, (CONFIG_DIR / "smoke.yaml").read_text() + saved)
    assert parse_file(path).float32 == {"unet": {"block_out_channels": [8, 16]}}
    assert parse_file(write_config(tmp_path, "float32_unet: null\n")).float32 is None


def test_a_key_given_on_the_command_line_wins_over_the_files_float32_recipe(tmp_path):
    path = write_config(tmp_path, (CONFIG_DIR / "smoke.yaml").read_text() + FLOAT32)
    three_levels = ["--unet.block_out_channels", "[8, 16, 32]", "--unet.down_block_types",
                    "[DownBlock2D, DownBlock2D, DownBlock2D]", "--unet.up_block_types",
                    "[UpBlock2D, UpBlock2D, UpBlock2D]"]
    # a U-Net given on the command line trains as given: the file's 2-level recipe would not fit 3 levels
    assert parse_file(path, *three_levels).float32 == {"learning_rate": "1e-4"}
    assert parse_file(path, "--unet.layers_per_block", 2).float32 == {"learning_rate": "1e-4"}
    assert parse_file(path, "--learning-rate=3e-4").float32 == {"unet": {"block_out_channels": [8, 16]}}
    assert parse_file(path, "--learning_rate", "3e-4", "--unet.layers_per_block", 2).float32 is None
    given = parse_file(path, *three_levels, "--float32", "{unet: {block_out_channels: [16, 24, 32]}}")
    assert given.float32 == {"unet": {"block_out_channels": [16, 24, 32]}}  # unless the command line sets one too
