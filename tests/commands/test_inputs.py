"""One-line errors for bad seeds, models and sizes, whichever command reads them: exit 2, no traceback, and nothing
written."""

import json
import os
import re

import pytest

from conftest import BIG_SEED, copy_model, run_cli
from ddpm_fashion.sampling import generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


SEED_COMMANDS = {
    "sample": lambda m, t: ["sample", "--model", m, "--out", t / "s.png"],
    "compare": lambda m, t: ["compare", "--model", m],
    "forward": lambda m, t: ["forward", "--out", t / "f.png"],
    "evaluate": lambda m, t: ["evaluate", "--model", m],
    "evaluate real-train": lambda m, t: ["evaluate", "--model", "real-train"],
    "train-classifier": lambda m, t: ["train-classifier", "--out", t / "classifier"],
}


@pytest.mark.parametrize("seed", [BIG_SEED, "-1", "4294967296"])
@pytest.mark.parametrize("command", SEED_COMMANDS)
def test_a_seed_out_of_range_is_one_line_naming_seed_and_its_range(model_dir, tmp_path, capsys, command, seed):
    code, _, stderr = run_cli([*SEED_COMMANDS[command](model_dir, tmp_path), "--seed", seed], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"argument --seed: must be an integer from 0 to 4294967295, got {seed}" in stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, content", [
    ("scheduler/scheduler_config.json", "[1]"),
    ("scheduler/scheduler_config.json", '"DDPMScheduler"'),
    ("unet/config.json", "[16, 32]"),
    ("unet/config.json", "null"),
    ("model_index.json", "[]"),
    ("unet/config.json", "{not json"),
])
@pytest.mark.parametrize("command", ["sample", "compare"])
def test_a_config_file_that_is_not_an_object_is_named_in_one_line(model_dir, tmp_path, capsys, name, content,
                                                                   command):
    import warnings

    model = copy_model(model_dir, tmp_path)
    (model / name).write_text(content)
    argv = [command, "--model", model, "--num_inference_steps", 2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, stdout, stderr = run_cli(argv + (["--out", tmp_path / "s.png"] if command == "sample" else []), capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert str(model / name) in stderr and ("JSON object" in stderr or "not valid JSON" in stderr), stderr
    assert "huggingface" not in stderr.lower() and "connect" not in stderr
    assert not [warning for warning in caught if issubclass(warning.category, FutureWarning)]
    assert sorted(os.listdir(tmp_path)) == ["model"]


def _with_non_finite_weights(model_dir, tmp_path, value):
    from safetensors.torch import load_file, save_file

    model = copy_model(model_dir, tmp_path)
    weights_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    name = sorted(weights)[0]
    weights[name].view(-1)[:3] = value
    save_file(weights, weights_file)
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("command, unet", [("sample", "diffusers"), ("sample", "own"), ("compare", None),
                                           ("evaluate", None)])
def test_non_finite_weights_are_refused_in_one_line_and_nothing_is_written(model_dir, tmp_path, capsys, value,
                                                                           command, unet):
    model = _with_non_finite_weights(model_dir, tmp_path, value)
    options = {"sample": ["--out", tmp_path / "s.png", "--unet", unet, "--num_images", 2],
               "compare": ["--json", tmp_path / "r.json", "--out", tmp_path / "c.png", "--num_images", 2],
               "evaluate": ["--json", tmp_path / "r.json", "--samples_file", tmp_path / "s.safetensors",
                            "--num_samples", 10]}[command]
    code, stdout, stderr = run_cli([command, "--model", model, "--num_inference_steps", 2, *options], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "the model's weights are not finite (3 of" in stderr
    assert "diffusion_pytorch_model.safetensors" in stderr and "differ from the library" not in stderr
    assert sorted(os.listdir(tmp_path)) == ["model"]


HUGE = 1_000_000_000
ABSURD_SIZES = {
    "sample batch": (lambda m: ["sample", "--model", m, "--num_images", HUGE, "--batch_size", HUGE],
                     r"a batch of 1000000000 images needs about [\d.]+ TB of memory, .* lower --batch_size$"),
    "sample images": (lambda m: ["sample", "--model", m, "--num_images", HUGE],
                      r"keeping 1000000000 images needs about [\d.]+ TB of memory, .* lower --num_images$"),
    "compare images": (lambda m: ["compare", "--model", m, "--num_images", HUGE],
                       r"a batch of 1000000000 images needs about .* lower --num_images$"),
    "evaluate batch": (lambda m: ["evaluate", "--model", m, "--num_samples", HUGE, "--batch_size", HUGE],
                       r"a batch of 1000000000 images needs about .* lower --batch_size$"),
    "evaluate samples": (lambda m: ["evaluate", "--model", m, "--num_samples", HUGE],
                         r"keeping 1000000000 images needs about .* lower --num_samples$"),
}


@pytest.mark.parametrize("case", ABSURD_SIZES)
def test_absurd_sizes_are_refused_up_front_naming_the_option(model_dir, tmp_path, capsys, monkeypatch, case):
    make_args, message = ABSURD_SIZES[case]
    monkeypatch.setattr(generate, "denoise", lambda *args, **kwargs: pytest.fail("sampled before checking sizes"))
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli([*make_args(model_dir), "--num_inference_steps", 2, "--device", "cpu"], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert re.search(message, stderr.strip()), stderr
    assert os.listdir(tmp_path) == []


def test_a_model_too_large_for_one_image_names_its_sample_size(model_dir, tmp_path, capsys):
    model = copy_model(model_dir, tmp_path)
    config_file = model / "unet" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "sample_size": 100000}))
    for command in ("sample", "compare"):
        code, _, stderr = run_cli([command, "--model", model, "--num_inference_steps", 2, "--num_images", 1], capsys)
        assert code == 2 and stderr.count("\n") == 1, stderr
        assert "one image of this model (sample_size 100000 in unet/config.json) needs about" in stderr, stderr
    assert sorted(os.listdir(tmp_path)) == ["model"]
