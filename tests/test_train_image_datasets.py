"""The trainer on image folders written here: in memory and streamed it trains the same model, resumes exactly,
publishes a pipeline of the data's shape, refuses bad data in one line, and 2 processes train as 1."""
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ENV, MULTI_PROCESS, ROOT, SMOKE, checkpoint_tensors, error_line, trainer_state
from ddpm_fashion.image_datasets import IN_MEMORY_VARIABLE

sys.path.insert(0, str(ROOT))
import train_accelerate  # noqa: E402

# 10 images, 4 a batch: epochs of 3 batches (the last one short), so 4 steps cross an epoch.
COMMON = ["--train_batch_size", 4, "--eval_batch_size", 2, "--ddpm_num_inference_steps", 2, "--save_images_steps",
          100, "--checkpointing_steps", 2, "--lr_scheduler", "constant_with_warmup"]


def write_folder(folder, count, shape, seed=0):
    """Write `count` random uint8 images of `shape` ([H, W] grey, [H, W, 3] colour) as PNG files."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def main_args(folder, output_dir, cache, *extra):
    """The trainer's arguments: the smoke config on an image folder."""
    return [str(a) for a in ["--config", SMOKE, "--train_data_dir", folder, "--cache_dir", cache, "--output_dir",
                             output_dir, *COMMON, *extra]]


def train(folder, output_dir, cache, *extra, in_memory_bytes=None):
    """Run the trainer's main() in this process on one thread; streamed when in_memory_bytes is 0."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DDPM_FASHION_NUM_THREADS", "1")  # small models: one thread, no fight with other tests
        if in_memory_bytes is not None:
            patch.setenv(IN_MEMORY_VARIABLE, str(in_memory_bytes))
        assert train_accelerate.main(main_args(folder, output_dir, cache, *extra)) == 0


@pytest.fixture(scope="module")
def rgb_runs(tmp_path_factory):
    """Four steps on 16x24 colour images three ways: in memory, streamed, and streamed in two sessions of two."""
    root = tmp_path_factory.mktemp("rgb-runs")
    folder, cache = write_folder(root / "images", 10, (16, 24, 3)), root / "cache"
    train(folder, root / "memory", cache, "--max_train_steps", 4)
    train(folder, root / "stream", cache, "--max_train_steps", 4, in_memory_bytes=0)
    train(folder, root / "resumed", cache, "--max_train_steps", 2, in_memory_bytes=0)
    train(folder, root / "resumed", cache, "--max_train_steps", 4, "--resume_from_checkpoint", "latest",
          in_memory_bytes=0)
    return root


def test_streamed_and_resumed_runs_equal_the_in_memory_run_bit_for_bit(rgb_runs):
    expected_model, expected_ema = checkpoint_tensors(rgb_runs / "memory", 4)
    for run in ("stream", "resumed"):
        assert trainer_state(rgb_runs / run, 4)["losses"] == trainer_state(rgb_runs / "memory", 4)["losses"], run
        model, ema = checkpoint_tensors(rgb_runs / run, 4)
        for got, expected in ((model, expected_model), (ema, expected_ema)):
            assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), run


def test_the_pipeline_takes_the_datas_shape_and_the_config_records_the_data(rgb_runs):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(rgb_runs / "memory")
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels, pipe.unet.config.sample_size) == (3, 3, 16)
    image = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0)).images[0]
    assert image.mode == "RGB" and image.size == (16, 16)
    saved = yaml.safe_load((rgb_runs / "memory" / "train_config.yaml").read_text())
    assert saved["train_data_dir"] == str((rgb_runs / "images").resolve())
    assert (saved["resolution"], saved["center_crop"], saved["unet"]["in_channels"]) == (16, False, 3)


def test_resume_refuses_another_dataset_or_crop(rgb_runs, tmp_path, capsys):
    run = shutil.copytree(rgb_runs / "memory", tmp_path / "run")
    other = write_folder(tmp_path / "other", 10, (16, 24, 3), seed=1)
    for folder, extra, named in ((other, [], "train_data_dir: "), (rgb_runs / "images", ["--center_crop"],
                                                                    "center_crop: False -> True")):
        code = train_accelerate.main(main_args(folder, run, tmp_path / "cache", "--max_train_steps", 6,
                                               "--resume_from_checkpoint", "latest", *extra))
        line = error_line(capsys.readouterr().err)
        assert code == 2 and "cannot resume from" in line and named in line, line


def unreadable(folder):
    """An image folder whose second file is not an image, though named like one."""
    write_folder(folder, 5, (16, 16, 3))
    (folder / "001.png").write_bytes(b"not a png")


@pytest.mark.parametrize("make, extra, message", [
    (lambda d: d.mkdir(), [], "is empty"),
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), [], "holds no images"),
    (unreadable, [], r"cannot read image \S*001\.png"),
    (lambda d: write_folder(d, 4, (16, 16, 3)), ["--resolution", 15], "resolution 15 is not a multiple of 2"),
    (lambda d: write_folder(d, 4, (16, 16, 3)), ["--unet.in_channels", 1], r"in_channels 1 \(the data needs 3\)"),
    (lambda d: write_folder(d, 4, (16, 16, 3)), ["--dataset_name", "cifar10"], "pass one of them"),
    (lambda d: write_folder(d, 4, (16, 16, 3)), ["--data_dir", "/usr/share/datasets/fashion-mnist"],
     "pass one of them"),
    (lambda d: write_folder(d, 4, (16, 16, 3)), ["--dataset_config_name", "plain_text"], "pass --dataset_name too"),
    (lambda d: write_folder(d, 4, (16, 16, 3)), ["--dataloader_num_workers", -1], "dataloader_num_workers must be"),
])
def test_bad_data_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, make, extra, message):
    make(tmp_path / "data")
    code = train_accelerate.main(main_args(tmp_path / "data", tmp_path / "out", tmp_path / "cache", *extra))
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "\n" not in line
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--dataset_name", "no-such-user/no-such-dataset"], "needs the network .* save_to_disk"),
    (["--resolution", 64], "resolution 64 does not fit FashionMNIST"),
    (["--center_crop"], "--center_crop applies to --train_data_dir and --dataset_name"),
    (["--dataloader_num_workers", 2], "FashionMNIST is one tensor in memory"),
])
def test_bad_dataset_options_without_a_folder_are_one_line(tmp_path, capsys, extra, message):
    code = train_accelerate.main([str(a) for a in ["--config", SMOKE, "--output_dir", tmp_path / "out", "--cache_dir",
                                                   tmp_path / "cache", *extra]])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and re.search(message, line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@MULTI_PROCESS
def test_two_streaming_processes_with_a_worker_train_as_one_in_memory_process(tmp_path):
    """MNIST-like 28x28 grey digits, random crops of 24 (28 resized to 24): torchrun with 2 processes x 2 images, each
    streaming through a DataLoader worker, gives the losses and weights of 1 process x 4 images in memory."""
    import subprocess

    folder, cache = write_folder(tmp_path / "digits", 10, (28, 36)), tmp_path / "cache"
    train(folder, tmp_path / "one", cache, "--max_train_steps", 4, "--resolution", 24)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "--master_port", "29533", str(ROOT / "train_accelerate.py"),
               *main_args(folder, tmp_path / "two", cache, "--max_train_steps", 4, "--resolution", 24,
                          "--train_batch_size", 2, "--dataloader_num_workers", 1)]
    env = {**ENV, IN_MEMORY_VARIABLE: "0", "DDPM_FASHION_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "streamed by 1 DataLoader worker(s)" in result.stdout + result.stderr
    assert trainer_state(tmp_path / "two", 4)["losses"] == pytest.approx(
        trainer_state(tmp_path / "one", 4)["losses"], rel=1e-5)
    model_one, _ = checkpoint_tensors(tmp_path / "one", 4)
    model_two, _ = checkpoint_tensors(tmp_path / "two", 4)
    assert model_two["conv_in.weight"].shape[1] == 1
    for key in model_one:
        # Adam divides by sqrt(v): float rounding in a near-zero gradient moves a weight by a fraction of an update
        # (lr 1e-3), so the tolerance is a tenth of one.
        torch.testing.assert_close(model_two[key], model_one[key], rtol=1e-4, atol=1e-4)
    assert os.path.isfile(tmp_path / "two" / "model_index.json")
