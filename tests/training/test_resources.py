"""ddpm_fashion.training.resources: how many torch threads a process takes, the bounds on what a user may ask for, and
the memory a batch needs."""

import os
import sys

import pytest
import torch

from conftest import ROOT
from ddpm_fashion.training.resources import THREADS_ENV, threads_per_process

sys.path.insert(0, str(ROOT))
import train_accelerate  # noqa: E402


@pytest.fixture
def two_cpus(monkeypatch):
    """This process may run on two logical CPUs, whatever the machine has."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize("value", ["3", "100000"])
def test_more_threads_than_usable_cpus_is_refused_naming_the_variable_and_range(monkeypatch, two_cpus, value):
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(ValueError) as error:
        threads_per_process()
    assert str(error.value) == (f"DDPM_FASHION_NUM_THREADS={value} is more than the 2 CPUs this process may use; "
                                "set 1 to 2")


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_thread_count_that_is_not_a_positive_integer_names_the_allowed_range(monkeypatch, two_cpus, value):
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(ValueError) as error:
        threads_per_process()
    assert str(error.value) == f"DDPM_FASHION_NUM_THREADS={value!r} must be a whole number from 1 to 2"


def test_as_many_threads_as_usable_cpus_is_allowed(monkeypatch, two_cpus):
    monkeypatch.setenv(THREADS_ENV, "2")
    assert threads_per_process() == (2, THREADS_ENV)


def test_omp_num_threads_above_the_usable_cpus_is_capped_and_the_reason_says_so(monkeypatch, two_cpus):
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert threads_per_process() == (2, "OMP_NUM_THREADS=64 capped to the 2 CPUs this process may use")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads_per_process() == (2, "OMP_NUM_THREADS")


def test_the_trainer_refuses_too_many_threads_before_writing_anything(monkeypatch, tmp_path, train_data_dir, capsys):
    monkeypatch.setenv(THREADS_ENV, "100000")
    code = train_accelerate.main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--output_dir",
                                  str(tmp_path / "out"), "--data_dir", train_data_dir])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "train_accelerate.py: error: DDPM_FASHION_NUM_THREADS=100000" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("impl", ["diffusers", "own"])
def test_measured_unet_memory_is_the_parameters_plus_activations_linear_in_the_batch(impl):
    import time

    from diffusers import UNet2DModel

    from ddpm_fashion.models.unet import UNet
    from ddpm_fashion.training.resources import TRAINING_PARAMETER_COPIES, UNADDRESSABLE, measure_unet_bytes

    config = {"sample_size": 32, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32],
              "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "attention_head_dim": 8}
    unet = UNet2DModel(**config)
    unet = UNet.from_diffusers(unet) if impl == "own" else unet
    weights = sum(p.numel() * 4 for p in unet.parameters())
    activations = {batch: measure_unet_bytes(unet, batch) - weights for batch in (1, 2, 8)}
    # the feature maps scale with the batch (our upsampler's kernels do not), so on the meta device the peak does
    per_image = activations[2] - activations[1]
    assert activations[8] - activations[1] == 7 * per_image and per_image > 32 * 32 * 16 * 4  # > the first map
    one_training = measure_unet_bytes(unet, 1, training=True) - TRAINING_PARAMETER_COPIES * weights
    assert one_training > 2 * activations[1]  # saved tensors and gradients
    started = time.perf_counter()
    absurd = measure_unet_bytes(unet, 10**9, training=True)  # nothing is allocated: shapes only
    assert absurd >= 10**9 * one_training * 0.9 and time.perf_counter() - started < 30
    assert all(p.device.type == "cpu" for p in unet.parameters())  # the model itself is untouched
    unet.config.sample_size = 10**5  # attention scores of 2.5e9 x 2.5e9 tokens: beyond 64-bit sizes
    assert measure_unet_bytes(unet, 1) == UNADDRESSABLE


@pytest.mark.usefixtures("one_thread")
def test_check_memory_names_the_option_only_when_it_does_not_fit():
    from ddpm_fashion.training.resources import available_memory, check_memory

    free = available_memory(torch.device("cpu"))
    check_memory(1000, "cpu", "a little", "--batch_size")
    with pytest.raises(ValueError, match=r"^a lot needs about .* of memory, more than the .* free on cpu; lower --x$"):
        check_memory(2 * free, "cpu", "a lot", "--x")
