"""ddpm_fashion/sampling/generate.py on tiny random pipelines: generate_images against DDPMPipeline, its seeding,
batches, progress bar, input checks and resume; the x_0 estimate."""

import pytest
import torch
from diffusers import DDPMPipeline
from diffusers import DDPMScheduler as LibraryDDPMScheduler

from conftest import BIG_SEED, SIZE
from ddpm_fashion.sampling import generate, own_vs_library, saved_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("scheduler", ["diffusers", "own"])
def test_generate_images_equals_ddpm_pipeline_call(model_dir, scheduler):
    pipe = saved_pipeline.load_pipeline(model_dir, scheduler=scheduler, unet="diffusers", device="cpu")
    ours = generate.generate_images(pipe, 3, batch_size=3, num_inference_steps=4, seed=7, progress=False)

    library = DDPMPipeline.from_pretrained(model_dir, local_files_only=True)
    library.set_progress_bar_config(disable=True)
    expected = library(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=4,
                       output_type="pt").images
    assert ours.shape == (3, 1, SIZE, SIZE) and ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert torch.equal(ours, expected)


def test_generate_images_in_batches_is_seeded_and_bounded_to_unit_range(model_dir):
    pipe = saved_pipeline.load_pipeline(model_dir, device="cpu")
    five = generate.generate_images(pipe, 5, batch_size=2, num_inference_steps=3, seed=1, progress=False)
    again = generate.generate_images(pipe, 5, batch_size=2, num_inference_steps=3, seed=1, progress=False)
    first_batch = generate.generate_images(pipe, 2, batch_size=2, num_inference_steps=3, seed=1, progress=False)
    other_seed = generate.generate_images(pipe, 2, batch_size=2, num_inference_steps=3, seed=2, progress=False)
    assert five.shape == (5, 1, SIZE, SIZE)
    assert five.min() >= 0 and five.max() <= 1
    assert torch.equal(five, again)
    assert torch.equal(five[:2], first_batch)  # one generator runs through the batches in order
    assert not torch.equal(five[2:4], five[:2])  # later batches continue the stream instead of restarting it
    assert (first_batch - other_seed).abs().max() > 0.01


@pytest.mark.parametrize("scheduler, walk", [("ddim", 9), ("ddim-to-t0", 10), ("dpm", 10)])
def test_the_progress_bar_counts_the_unet_calls_of_the_walk(model_dir, scheduler, walk, capsys):
    """`ddim` ends at t = 40, so 10 leading steps (900, ..., 100, 0) make 9 U-Net calls, and the bar ends full."""
    pipe = saved_pipeline.load_pipeline(model_dir, scheduler=scheduler, device="cpu")
    calls = []
    unet_forward = pipe.unet.forward
    pipe.unet.forward = lambda *args, **kwargs: calls.append(1) or unet_forward(*args, **kwargs)
    generate.generate_images(pipe, 3, batch_size=2, num_inference_steps=10, seed=0, progress=True)
    assert len(calls) == 2 * walk
    assert f"{2 * walk}/{2 * walk}" in capsys.readouterr().err


def test_generate_images_checks_inputs_before_running_the_unet(model_dir, monkeypatch):
    pipe = saved_pipeline.load_pipeline(model_dir, device="cpu")
    monkeypatch.setattr(pipe.unet, "forward", lambda *args, **kwargs: pytest.fail("the U-Net ran on bad input"))
    for steps in (0, -1, 1001):
        with pytest.raises(ValueError, match="num_inference_steps must be between 1 and the 1000"):
            generate.generate_images(pipe, 2, num_inference_steps=steps, progress=False)
    with pytest.raises(ValueError, match="num_images must be a positive integer"):
        generate.generate_images(pipe, 0, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        generate.generate_images(pipe, 2, batch_size=0, num_inference_steps=2, progress=False)


def test_library_functions_refuse_a_seed_torch_cannot_take(model_dir):
    pipe = saved_pipeline.load_pipeline(model_dir, device="cpu")
    with pytest.raises(ValueError, match="seed must be an integer from 0 to 4294967295"):
        generate.generate_images(pipe, 1, num_inference_steps=1, seed=int(BIG_SEED), progress=False)
    with pytest.raises(ValueError, match="seed must be an integer from 0 to 4294967295"):
        own_vs_library.run_comparison(model_dir, 1, 1, seed=-1, device="cpu", progress=False)


def test_predicted_original_matches_the_library_step():
    scheduler = LibraryDDPMScheduler(clip_sample=False)  # step() clips its x_0 estimate; ours is unclipped
    sample, model_output = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for timestep in (999, 500, 1):
        expected = scheduler.step(model_output, timestep, sample).pred_original_sample
        got = generate.predicted_original(scheduler, model_output, torch.tensor(timestep), sample)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_generate_images_resumed_after_any_whole_batch_equals_the_uninterrupted_run(tiny_pipeline):
    from ddpm_fashion.sampling.generate import generate_images
    from ddpm_fashion.sampling.saved_pipeline import load_pipeline

    pipe = load_pipeline(tiny_pipeline, scheduler="own", device="cpu")
    uninterrupted = generate_images(pipe, 10, batch_size=4, num_inference_steps=3, seed=3, progress=False)
    snapshots = []
    generate_images(pipe, 10, batch_size=4, num_inference_steps=3, seed=3, progress=False,
                    on_batch=lambda images, generator: snapshots.append((images.clone(), generator.get_state())))
    assert [len(images) for images, _ in snapshots] == [4, 8, 10]
    assert torch.equal(snapshots[-1][0], uninterrupted)
    for snapshot in snapshots[:2]:
        resumed = generate_images(pipe, 10, batch_size=4, num_inference_steps=3, seed=3, progress=False,
                                  resume=snapshot)
        assert torch.equal(resumed, uninterrupted)
    with pytest.raises(ValueError, match="whole batches"):  # 10 images are not whole batches of 4
        generate_images(pipe, 12, batch_size=4, num_inference_steps=3, seed=3, progress=False, resume=snapshots[-1])
