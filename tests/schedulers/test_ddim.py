"""EndingDDIMScheduler: diffusers' DDIM, its walk ended at final_timestep with that step's x_0 estimate."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

from ddpm_fashion import EndingDDIMScheduler
from ddpm_fashion.sampling.saved_pipeline import build_scheduler, sampler_settings
from ddpm_fashion.schedulers.ddim import FINAL_TIMESTEP
from ddpm_fashion.schedulers.ddpm import DDPMScheduler

DDPM_CONFIG = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").config


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    return unet.eval()


def sample_with(unet, scheduler, steps):
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=3, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="np").images


@pytest.mark.parametrize("steps", [50, 100, 250])
def test_leading_walks_of_50_100_250_steps_all_end_at_t_40(steps):
    scheduler = EndingDDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False)
    scheduler.set_timesteps(steps)
    plain = DDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False)
    plain.set_timesteps(steps)
    assert FINAL_TIMESTEP == 40 and int(scheduler.timesteps[-1]) == 40
    # the same timesteps as DDIM down to t = 40, and none below
    assert scheduler.timesteps.tolist() == [t for t in plain.timesteps.tolist() if t >= 40]


def test_trailing_spacing_ends_at_the_first_timestep_at_or_above_the_end():
    scheduler = EndingDDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False, timestep_spacing="trailing")
    scheduler.set_timesteps(50)  # trailing: 999, 979, ..., 39, 19
    assert scheduler.timesteps.tolist()[-2:] == [79, 59]  # 39 is below the end


def test_a_walk_with_nothing_at_or_above_the_end_keeps_its_first_timestep():
    scheduler = EndingDDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False)
    scheduler.final_timestep = 999
    scheduler.set_timesteps(3)  # leading: 666, 333, 0
    assert scheduler.timesteps.tolist() == [666]


def test_final_timestep_0_is_diffusers_ddim_bit_for_bit(tiny_unet):
    ours = EndingDDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False)
    ours.final_timestep = 0
    theirs = DDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False)
    assert (sample_with(tiny_unet, ours, 10) == sample_with(tiny_unet, theirs, 10)).all()


def test_the_walk_returns_the_x0_estimate_of_its_last_timestep(tiny_unet):
    """Plain DDIM over the kept timesteps, then x_0_hat at the last kept one instead of the steps below it."""
    scheduler = EndingDDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False)
    images = sample_with(tiny_unet, scheduler, 10)  # leading: 900, ..., 100, 0 -> ends at 100
    assert scheduler.timesteps.tolist()[-1] == 100

    plain = DDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False)
    plain.set_timesteps(10)
    generator = torch.manual_seed(0)
    sample = torch.randn((3, 1, 8, 8), generator=generator)
    with torch.no_grad():
        for timestep in plain.timesteps[:-1]:
            output = plain.step(tiny_unet(sample, timestep).sample, timestep, sample)
            sample = output.prev_sample
    expected = (output.pred_original_sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(images - expected).max() < 1e-6
    # ... which is not what walking on to t = 0 gives
    to_t0 = DDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False)
    assert abs(images - sample_with(tiny_unet, to_t0, 10)).max() > 1e-3


def test_step_tuple_form_matches_diffusers_and_the_last_step_gives_x0_for_any_eta():
    scheduler = EndingDDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False)
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(1)
    sample, model_output = torch.randn(2, 1, 4, 4, generator=generator), torch.randn(2, 1, 4, 4, generator=generator)
    prev, x0 = scheduler.step(model_output, 40, sample, return_dict=False)
    assert torch.equal(prev, x0)
    # stochastic DDIM too: the step to alpha_bar = 1 has no noise term
    prev, x0 = scheduler.step(model_output, 40, sample, eta=1.0, generator=torch.Generator().manual_seed(2),
                              return_dict=False)
    assert torch.equal(prev, x0)
    prev, x0 = scheduler.step(model_output, 60, sample, return_dict=False)
    plain = DDIMScheduler.from_config(DDPM_CONFIG, clip_sample=False)
    plain.set_timesteps(50)
    expected = plain.step(model_output, 60, sample, return_dict=False)
    assert torch.equal(prev, expected[0]) and torch.equal(x0, expected[1])


def test_cli_choices_build_the_ending_and_the_full_walk_and_say_so_in_samples_file_settings():
    ending, full = build_scheduler("ddim", DDPM_CONFIG), build_scheduler("ddim-to-t0", DDPM_CONFIG)
    assert not ending.config.clip_sample and not full.config.clip_sample
    assert (ending.final_timestep, full.final_timestep) == (FINAL_TIMESTEP, 0)
    # a samples file made by `ddim` before it ended early ({"sampler": "ddim"}) differs from today's `ddim`
    assert sampler_settings("ddim", ending) == {"sampler": "ddim", "final_timestep": FINAL_TIMESTEP}
    assert sampler_settings("ddim-to-t0", full) == {"sampler": "ddim-to-t0"}
    assert sampler_settings("dpm", build_scheduler("dpm", DDPM_CONFIG)) == {"sampler": "dpm"}
