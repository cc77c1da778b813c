"""Our DDPMScheduler against diffusers.DDPMScheduler: the same numbers for every option, and clear errors where
diffusers fails.

"Same" means bit for bit (torch.testing.assert_close with rtol=atol=0, NaN equal to NaN) unless a test says
otherwise; random draws are checked by comparing the generators' states after each step.
"""

import inspect
import math
import re
import warnings
from functools import partial

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_fashion.schedulers.ddpm import (
    BETA_SCHEDULES,
    LEARNED_VARIANCE_TYPES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    VARIANCE_FORMS,
    VARIANCE_TYPES,
    DDPMScheduler,
)

Reference = diffusers.DDPMScheduler
assert_identical = partial(torch.testing.assert_close, rtol=0, atol=0, equal_nan=True)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Variance types both implementations compute the same way; fixed_large_log is NaN in diffusers (issue #14569).
SHARED_VARIANCE_TYPES = tuple(v for v in VARIANCE_TYPES if v != "fixed_large_log")
# Non-default values for every option, so a config that is silently ignored shows up.
NON_DEFAULT_CONFIG = dict(
    num_train_timesteps=500,
    beta_start=0.0002,
    beta_end=0.03,
    beta_schedule="scaled_linear",
    variance_type="learned_range",
    clip_sample=False,
    prediction_type="v_prediction",
    thresholding=True,
    dynamic_thresholding_ratio=0.9,
    clip_sample_range=2.0,
    sample_max_value=1.5,
    timestep_spacing="trailing",
    steps_offset=1,
    rescale_betas_zero_snr=True,
)


def both(**config):
    """Get (ours, diffusers') scheduler built from the same config."""
    return DDPMScheduler(**config), Reference(**config)


def model_output_for(scheduler, sample, seed):
    """Get a random model output for sample: 2 x C channels (prediction, variance) for learned variances."""
    generator = torch.Generator().manual_seed(seed)
    prediction = torch.randn(sample.shape, generator=generator).to(sample.dtype)
    variance_type = scheduler.config.variance_type
    if variance_type == "learned":  # the model outputs sigma^2 itself: keep it positive and small
        variance = torch.rand(sample.shape, generator=generator) * 0.02
    elif variance_type == "learned_range":  # the model outputs an interpolation weight in [-1, 1]
        variance = torch.rand(sample.shape, generator=generator) * 2 - 1
    else:
        return prediction
    return torch.cat([prediction, variance.to(sample.dtype)], dim=1)


def assert_steps_identical(ours, theirs, sample, timesteps, generator_seed=0, model_output_seed=0):
    """Run both schedulers over timesteps from the same sample and random model outputs; assert identical."""
    ours_generator = torch.Generator().manual_seed(generator_seed)
    theirs_generator = torch.Generator().manual_seed(generator_seed)
    ours_sample = theirs_sample = sample
    for i, t in enumerate(timesteps):
        model_output = model_output_for(ours, ours_sample, model_output_seed + i)
        ours_out = ours.step(model_output, t, ours_sample, generator=ours_generator)
        theirs_out = theirs.step(model_output, t, theirs_sample, generator=theirs_generator)
        assert_identical(ours_out.pred_original_sample, theirs_out.pred_original_sample)
        assert_identical(ours_out.prev_sample, theirs_out.prev_sample)
        # Same number and order of random draws.
        assert torch.equal(ours_generator.get_state(), theirs_generator.get_state())
        ours_sample, theirs_sample = ours_out.prev_sample, theirs_out.prev_sample


# --- The options are the installed diffusers' options -----------------------------------------------------------


def names_compared_in_source(function, variable):
    """Get the string literals that diffusers' source compares `variable` against (`variable == "name"`)."""
    return set(re.findall(rf'{re.escape(variable)} == "(\w+)"', inspect.getsource(function)))


def test_option_names_are_exactly_those_the_installed_diffusers_accepts():
    assert set(BETA_SCHEDULES) == names_compared_in_source(Reference.__init__, "beta_schedule")
    assert set(VARIANCE_TYPES) == names_compared_in_source(Reference._get_variance, "variance_type")
    assert set(PREDICTION_TYPES) == names_compared_in_source(Reference.step, "self.config.prediction_type")
    assert set(TIMESTEP_SPACINGS) == names_compared_in_source(Reference.set_timesteps, "self.config.timestep_spacing")


@pytest.mark.parametrize("method", ["__init__", "set_timesteps", "step", "add_noise", "get_velocity",
                                    "scale_model_input", "previous_timestep", "_get_variance", "_threshold_sample"])
def test_signatures_match_diffusers(method):
    ours = inspect.signature(getattr(DDPMScheduler, method)).parameters
    theirs = inspect.signature(getattr(Reference, method)).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


def test_default_attributes_match_diffusers():
    ours, theirs = both()
    assert len(ours) == len(theirs) == 1000
    assert ours.order == theirs.order == 1
    assert ours.init_noise_sigma == theirs.init_noise_sigma == 1.0
    assert ours.num_inference_steps is theirs.num_inference_steps is None
    assert_identical(ours.timesteps, theirs.timesteps)
    sample = torch.randn(2, 1, 4, 4)
    assert ours.scale_model_input(sample, 7) is sample
    assert dict(ours.config) == dict(theirs.config)


# --- Noise schedule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", list(BETA_SCHEDULES))
@pytest.mark.parametrize("rescale_betas_zero_snr", [False, True])
@pytest.mark.parametrize("num_train_timesteps, beta_start, beta_end", [(1000, 0.0001, 0.02), (37, 0.00085, 0.012)])
def test_betas_and_alphas_cumprod_match(beta_schedule, rescale_betas_zero_snr, num_train_timesteps, beta_start,
                                        beta_end):
    ours, theirs = both(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale_betas_zero_snr,
                        num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end)
    assert ours.betas.dtype == torch.float32 and ours.betas.shape == (num_train_timesteps,)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert_identical(getattr(ours, name), getattr(theirs, name))
    if rescale_betas_zero_snr:
        assert ours.alphas_cumprod[-1] == 0  # zero terminal SNR


def test_trained_betas_are_used_as_given():
    trained_betas = np.linspace(0.001, 0.05, 50) ** 1.5
    ours, theirs = both(num_train_timesteps=50, trained_betas=trained_betas, beta_schedule="sigmoid")
    assert_identical(ours.betas, torch.tensor(trained_betas, dtype=torch.float32))
    assert_identical(ours.alphas_cumprod, theirs.alphas_cumprod)


# --- Timesteps --------------------------------------------------------------------------------------------------


def diffusers_schedule_is_valid(schedule, num_inference_steps, num_train_timesteps):
    """Whether diffusers' schedule has the asked-for length and stays inside the training timesteps."""
    return len(schedule) == num_inference_steps and 0 <= schedule.min() and schedule.max() < num_train_timesteps


@pytest.mark.parametrize("timestep_spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("num_train_timesteps", [1, 7, 1000])
def test_timesteps_match_for_every_step_count(timestep_spacing, steps_offset, num_train_timesteps):
    ours, theirs = both(timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                        num_train_timesteps=num_train_timesteps)
    fixed_by_us = 0
    for num_inference_steps in range(1, num_train_timesteps + 1):
        theirs.set_timesteps(num_inference_steps)
        reference = theirs.timesteps
        if diffusers_schedule_is_valid(reference, num_inference_steps, num_train_timesteps):
            ours.set_timesteps(num_inference_steps)
            assert_identical(ours.timesteps, reference)
            assert ours.num_inference_steps == num_inference_steps
            for t in reference[:2].tolist() + reference[-2:].tolist():
                assert ours.previous_timestep(t) == int(theirs.previous_timestep(t))
        elif timestep_spacing == "trailing":
            # diffusers' float arange overshoots by one step that lands on timestep -1; ours stops at n steps.
            ours.set_timesteps(num_inference_steps)
            assert reference[num_inference_steps:].tolist() == [-1]
            assert_identical(ours.timesteps, reference[:num_inference_steps])
            fixed_by_us += 1
        else:
            # leading + steps_offset runs past the last training timestep: diffusers would index out of range.
            assert timestep_spacing == "leading" and reference.max() >= num_train_timesteps
            with pytest.raises(ValueError, match="past the last training timestep"):
                ours.set_timesteps(num_inference_steps)
            fixed_by_us += 1
    diffusers_can_be_wrong = timestep_spacing == "trailing" or (timestep_spacing == "leading" and steps_offset > 0)
    if num_train_timesteps == 1000 and diffusers_can_be_wrong:
        assert fixed_by_us > 0  # the grid does reach the cases where diffusers is wrong


def test_custom_timesteps_and_device():
    ours, theirs = both()
    custom = [100, 87, 50, 1, 0]
    ours.set_timesteps(timesteps=custom, device="cpu")
    theirs.set_timesteps(timesteps=custom, device="cpu")
    assert_identical(ours.timesteps, theirs.timesteps)
    assert ours.custom_timesteps and ours.num_inference_steps == len(custom)
    assert [ours.previous_timestep(t) for t in custom] == [87, 50, 1, 0, -1]
    # Back to evenly spaced steps: custom mode is switched off again.
    ours.set_timesteps(10)
    assert not ours.custom_timesteps and ours.previous_timestep(900) == 800


# --- step() -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", SHARED_VARIANCE_TYPES)
@pytest.mark.parametrize("x0_limit", ["none", "clip", "threshold"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_step_matches_diffusers(prediction_type, variance_type, x0_limit, dtype):
    config = dict(prediction_type=prediction_type, variance_type=variance_type, clip_sample=x0_limit == "clip",
                  clip_sample_range=1.5, thresholding=x0_limit == "threshold", dynamic_thresholding_ratio=0.9,
                  sample_max_value=1.7)
    sample = (torch.randn(3, 2, 5, 4) * 2).to(dtype)
    # Every training timestep near both ends (no set_timesteps): t = 0 adds no noise, t = 999 is pure noise.
    ours, theirs = both(**config)
    assert_steps_identical(ours, theirs, sample, [999, 998, 500, 2, 1, 0])
    # Strided inference steps, passing timesteps as the pipeline does (0-d tensors).
    ours, theirs = both(**config)
    ours.set_timesteps(13)
    theirs.set_timesteps(13)
    assert_steps_identical(ours, theirs, sample, list(ours.timesteps), generator_seed=1)
    # Custom timesteps that end above 0: diffusers still adds noise on that final step, and so do we.
    ours, theirs = both(**config)
    ours.set_timesteps(timesteps=[950, 400, 30, 3])
    theirs.set_timesteps(timesteps=[950, 400, 30, 3])
    assert_steps_identical(ours, theirs, sample, [950, 400, 30, 3], generator_seed=2)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_step_output_dtype_shape_and_tuple_form(dtype):
    scheduler = DDPMScheduler()
    sample = torch.randn(2, 3, 4, 4).to(dtype)
    output = scheduler.step(torch.randn(2, 3, 4, 4).to(dtype), 10, sample, generator=torch.Generator().manual_seed(0))
    as_tuple = scheduler.step(torch.randn(2, 3, 4, 4).to(dtype), 10, sample, generator=torch.Generator().manual_seed(0),
                              return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert output.prev_sample.dtype == dtype and output.prev_sample.shape == sample.shape
    assert output.pred_original_sample.dtype == dtype


def test_list_of_generators_draws_per_image_like_diffusers():
    ours, theirs = both(variance_type="fixed_large")
    sample = torch.randn(3, 1, 4, 4)
    model_output = torch.randn(3, 1, 4, 4)
    ours_generators = [torch.Generator().manual_seed(seed) for seed in (5, 6, 7)]
    theirs_generators = [torch.Generator().manual_seed(seed) for seed in (5, 6, 7)]
    ours_out = ours.step(model_output, 400, sample, generator=ours_generators).prev_sample
    theirs_out = theirs.step(model_output, 400, sample, generator=theirs_generators).prev_sample
    assert_identical(ours_out, theirs_out)
    for ours_generator, theirs_generator in zip(ours_generators, theirs_generators):
        assert torch.equal(ours_generator.get_state(), theirs_generator.get_state())


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_fixed_large_log_is_finite_and_equals_fixed_large(prediction_type):
    # diffusers takes the square root of log(beta_t) here and returns NaN (huggingface/diffusers#14569).
    sample = torch.randn(2, 2, 4, 4)
    model_output = torch.randn(2, 2, 4, 4)
    log_form = DDPMScheduler(variance_type="fixed_large_log", prediction_type=prediction_type)
    plain_form = Reference(variance_type="fixed_large", prediction_type=prediction_type)
    for t in (999, 500, 1):
        ours = log_form.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
        reference = plain_form.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
        assert torch.isfinite(ours.prev_sample).all()
        torch.testing.assert_close(ours.prev_sample, reference.prev_sample, rtol=0, atol=1e-6)
        assert_identical(ours.pred_original_sample, reference.pred_original_sample)
    broken = Reference(variance_type="fixed_large_log").step(model_output, 500, sample).prev_sample
    assert torch.isnan(broken).all(), "diffusers fixed #14569: compare fixed_large_log to it directly instead"


@settings(max_examples=150, deadline=None)
@given(
    num_train_timesteps=st.integers(2, 1000),
    beta_schedule=st.sampled_from(list(BETA_SCHEDULES)),
    beta_start=st.floats(1e-5, 1e-3),
    beta_end=st.floats(5e-3, 5e-2),
    variance_type=st.sampled_from(SHARED_VARIANCE_TYPES),
    prediction_type=st.sampled_from(PREDICTION_TYPES),
    clip_sample=st.booleans(),
    clip_sample_range=st.floats(0.5, 3.0),
    thresholding=st.booleans(),
    dynamic_thresholding_ratio=st.floats(0.5, 1.0),
    sample_max_value=st.floats(1.0, 3.0),
    timestep_spacing=st.sampled_from(TIMESTEP_SPACINGS),
    steps_offset=st.integers(0, 2),
    rescale_betas_zero_snr=st.booleans(),
    step_fraction=st.floats(0.0, 1.0),
    custom=st.booleans(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=st.sampled_from([(1, 1, 4, 4), (2, 3, 5, 7), (4, 2, 8), (2, 1, 2, 3, 3)]),
    seed=st.integers(0, 2**16),
)
def test_random_configs_and_schedules_match_diffusers(num_train_timesteps, step_fraction, custom, dtype, shape, seed,
                                                      **config):
    ours, theirs = both(num_train_timesteps=num_train_timesteps, **config)
    generator = torch.Generator().manual_seed(seed)
    num_inference_steps = max(1, round(step_fraction * num_train_timesteps))
    if custom:
        drawn = torch.randperm(num_train_timesteps, generator=generator)[:num_inference_steps]
        timesteps = sorted(drawn.tolist(), reverse=True)
        ours.set_timesteps(timesteps=timesteps)
        theirs.set_timesteps(timesteps=timesteps)
    else:
        theirs.set_timesteps(num_inference_steps)
        if not diffusers_schedule_is_valid(theirs.timesteps, num_inference_steps, num_train_timesteps):
            return  # diffusers' own schedule is broken here; test_timesteps_match_for_every_step_count covers it
        ours.set_timesteps(num_inference_steps)
    assert_identical(ours.timesteps, theirs.timesteps)
    for name in ("betas", "alphas_cumprod"):
        assert_identical(getattr(ours, name), getattr(theirs, name))
    # The first steps and the last ones, where clipping, the zero-SNR end and t = 0 matter.
    timesteps = ours.timesteps.tolist()
    sample = torch.randn(shape, generator=generator).to(dtype)
    assert_steps_identical(ours, theirs, sample, timesteps[:3], generator_seed=seed, model_output_seed=seed)
    assert_steps_identical(ours, theirs, sample, timesteps[-3:], generator_seed=seed, model_output_seed=seed + 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU tests cover the arithmetic")
@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_cuda_tensors_match_diffusers(generator_device):
    ours, theirs = both(variance_type="fixed_large")
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10, device="cuda")
    x0, noise = torch.randn(4, 1, 8, 8, device="cuda"), torch.randn(4, 1, 8, 8, device="cuda")
    timesteps = torch.tensor([1, 10, 500, 999], device="cuda")
    sample = ours.add_noise(x0, noise, timesteps)
    torch.testing.assert_close(sample, theirs.add_noise(x0, noise, timesteps), rtol=0, atol=1e-6)
    ours_generator = torch.Generator(generator_device).manual_seed(0)
    theirs_generator = torch.Generator(generator_device).manual_seed(0)
    for t in ours.timesteps:
        model_output = torch.randn(sample.shape, device="cuda")
        ours_out = ours.step(model_output, t, sample, generator=ours_generator)
        theirs_out = theirs.step(model_output, t, sample, generator=theirs_generator)
        assert ours_out.prev_sample.device.type == "cuda"
        torch.testing.assert_close(ours_out.prev_sample, theirs_out.prev_sample, rtol=0, atol=1e-6)
        # diffusers returns an element of the CUDA .timesteps, and a CPU tensor for the final -1.
        assert_same_value_and_type(ours.previous_timestep(t), theirs.previous_timestep(t))
        sample = ours_out.prev_sample


# --- Forward process --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (6, 3), (6, 2, 5), (6, 2, 3, 4, 5)])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_add_noise_and_get_velocity_match(dtype, shape, beta_schedule):
    ours, theirs = both(beta_schedule=beta_schedule)
    original = torch.randn(shape).to(dtype)
    noise = torch.randn(shape).to(dtype)
    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])
    for method in ("add_noise", "get_velocity"):
        ours_value = getattr(ours, method)(original, noise, timesteps)
        assert ours_value.dtype == dtype and ours_value.shape == shape
        assert_identical(ours_value, getattr(theirs, method)(original, noise, timesteps))
        # One timestep for the whole batch, as a 0-d tensor.
        assert_identical(getattr(ours, method)(original, noise, timesteps[3]),
                         getattr(theirs, method)(original, noise, timesteps[3]))


def test_add_noise_is_eq4_closed_form():
    scheduler = DDPMScheduler()
    x0, noise = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.randn(2, 1, 3, 3, dtype=torch.float64)
    timesteps = torch.tensor([10, 900])
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0).double()[timesteps]
    expected = alpha_bar.sqrt().view(2, 1, 1, 1) * x0 + (1 - alpha_bar).sqrt().view(2, 1, 1, 1) * noise
    torch.testing.assert_close(scheduler.add_noise(x0, noise, timesteps), expected, rtol=0, atol=1e-12)
    # The velocity of eq. 4's x_t gives back x_0 = sqrt(abar) x_t - sqrt(1 - abar) v (Salimans & Ho 2022).
    x_t, velocity = scheduler.add_noise(x0, noise, timesteps), scheduler.get_velocity(x0, noise, timesteps)
    recovered = alpha_bar.sqrt().view(2, 1, 1, 1) * x_t - (1 - alpha_bar).sqrt().view(2, 1, 1, 1) * velocity
    torch.testing.assert_close(recovered, x0, rtol=0, atol=1e-12)


# --- diffusers' own golden numbers (tests/schedulers/test_scheduler_ddpm.py, SchedulerCommonTest) ---------------


def dummy_sample_deter():
    """diffusers' SchedulerCommonTest.dummy_sample_deter: 4x3x8x8 values i/768 in a fixed permuted order."""
    num_elems = 4 * 3 * 8 * 8
    return (torch.arange(num_elems).reshape(3, 8, 8, 4) / num_elems).permute(3, 0, 1, 2)


def dummy_noise_deter():
    """diffusers' SchedulerCommonTest.dummy_noise_deter: dummy_sample_deter's values in reverse order."""
    num_elems = 4 * 3 * 8 * 8
    return (torch.arange(num_elems).flip(-1).reshape(3, 8, 8, 4) / num_elems).permute(3, 0, 1, 2)


def dummy_model(sample, t):
    """diffusers' SchedulerCommonTest.dummy_model: sample * t / (t + 1)."""
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1, *(1,) * (sample.ndim - 1)).to(sample.dtype)
    return sample * t / (t + 1)


GOLDEN_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     variance_type="fixed_small", clip_sample=True)


@pytest.mark.parametrize("prediction_type, expected_sum, expected_mean",
                         [("epsilon", 258.9606, 0.3372), ("v_prediction", 202.0296, 0.2631)])
def test_full_loop_reproduces_diffusers_golden_numbers(prediction_type, expected_sum, expected_mean):
    results = []
    for scheduler in both(prediction_type=prediction_type, **GOLDEN_CONFIG):
        sample, generator = dummy_sample_deter(), torch.manual_seed(0)
        for t in reversed(range(len(scheduler))):
            sample = scheduler.step(dummy_model(sample, t), t, sample, generator=generator).prev_sample
        results.append(sample)
    ours, theirs = results
    assert abs(ours.abs().sum().item() - expected_sum) < 1e-2  # diffusers' own tolerances
    assert abs(ours.abs().mean().item() - expected_mean) < 1e-3
    assert_identical(ours, theirs)


def test_full_loop_with_noise_reproduces_diffusers_golden_numbers():
    scheduler = DDPMScheduler(**GOLDEN_CONFIG)
    generator = torch.manual_seed(0)
    timesteps = scheduler.timesteps[len(scheduler) - 2:]  # [1, 0]
    sample = scheduler.add_noise(dummy_sample_deter(), dummy_noise_deter(), timesteps[:1])
    for t in timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample, generator=generator).prev_sample
    assert abs(sample.abs().sum().item() - 387.9466) < 1e-2
    assert abs(sample.abs().mean().item() - 0.5051) < 1e-3


# --- Config: save/load and interchange with diffusers -----------------------------------------------------------


def assert_same_behaviour(first, second):
    """Assert two schedulers give identical timesteps and steps on a short sampling run."""
    for scheduler in (first, second):
        scheduler.set_timesteps(7)
    assert_identical(first.timesteps, second.timesteps)
    assert_steps_identical(first, second, torch.randn(2, 2, 4, 4), list(first.timesteps))


def test_save_pretrained_round_trip(tmp_path):
    trained_betas = np.linspace(1e-4, 0.02, 500)
    config = dict(NON_DEFAULT_CONFIG, trained_betas=trained_betas, rescale_betas_zero_snr=False)
    original = DDPMScheduler(**config)
    original.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    reloaded = DDPMScheduler.from_pretrained(tmp_path)
    assert type(reloaded) is DDPMScheduler
    assert {k: v for k, v in reloaded.config.items() if k != "trained_betas"} == {
        k: v for k, v in original.config.items() if k != "trained_betas"}
    assert_identical(reloaded.betas, original.betas)
    assert_same_behaviour(reloaded, original)
    # diffusers reads our saved config, and we read diffusers'.
    theirs = Reference.from_pretrained(tmp_path)
    assert_same_behaviour(DDPMScheduler(**config), theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    assert_same_behaviour(DDPMScheduler.from_pretrained(tmp_path / "theirs"), Reference(**config))


def test_from_config_works_both_ways():
    theirs = Reference(**NON_DEFAULT_CONFIG)
    ours = DDPMScheduler.from_config(theirs.config)
    assert type(ours) is DDPMScheduler
    back = Reference.from_config(ours.config)
    assert type(back) is Reference
    for key, value in NON_DEFAULT_CONFIG.items():
        assert ours.config[key] == value and back.config[key] == value
    assert_same_behaviour(ours, back)
    # Other diffusers schedulers take our config too (the _compatibles list).
    assert diffusers.DDIMScheduler in DDPMScheduler().compatibles
    assert diffusers.DDIMScheduler.from_config(ours.config).config.prediction_type == "v_prediction"


# --- In a diffusers pipeline ------------------------------------------------------------------------------------


def tiny_unet(out_channels=1):
    """A small random UNet2DModel for 8x8 grey images."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


@pytest.mark.parametrize("variance_type, out_channels", [("fixed_small", 1), ("learned_range", 2)])
def test_ddpm_pipeline_gives_identical_images(variance_type, out_channels):
    unet = tiny_unet(out_channels).eval()
    images = []
    for scheduler_class in (Reference, DDPMScheduler):
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler_class(variance_type=variance_type))
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(batch_size=4, num_inference_steps=20, generator=torch.Generator().manual_seed(0),
                           output_type="np").images)
    assert images[0].shape == (4, 8, 8, 1)
    assert np.array_equal(images[0], images[1])
    assert images[0].std() > 0  # not a constant image: the comparison means something


def test_readme_swap_example():
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=Reference(beta_schedule="squaredcos_cap_v2"))
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is DDPMScheduler and pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"


# --- Drop-in details: names, return types and the private helpers diffusers code calls --------------------------


def test_every_public_and_private_name_of_diffusers_exists_on_ours():
    ours, theirs = both()
    assert set(dir(theirs)) - set(dir(ours)) == set()
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(timesteps=[50, 7, 0])
    assert set(dir(theirs)) - set(dir(ours)) == set()
    assert DDPMScheduler._compatibles == Reference._compatibles
    assert DDPMScheduler.config_name == Reference.config_name == "scheduler_config.json"
    assert DDPMScheduler._get_variance is DDPMScheduler.reverse_variance


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_attributes_diffusers_sets_read_the_same_without_warnings(variance_type):
    ours, theirs = both(variance_type=variance_type, num_train_timesteps=37)
    with warnings.catch_warnings():
        # ConfigMixin answers a missing attribute from the config with a FutureWarning: ours must not rely on that.
        warnings.simplefilter("error")
        for name in vars(theirs):
            ours_value, theirs_value = getattr(ours, name), getattr(theirs, name)
            if isinstance(theirs_value, torch.Tensor):
                assert_identical(ours_value, theirs_value)
            else:
                assert ours_value == theirs_value, name
    assert ours.variance_type == variance_type and len(ours) == len(theirs) == 37
    # diffusers' step reads its copy of variance_type; ours reads the config, so a copy cannot be reassigned.
    with pytest.raises(AttributeError):
        ours.variance_type = "fixed_large"


def assert_same_value_and_type(ours, theirs):
    """Assert two results are equal and of the same type; tensors also of the same dtype, device and shape."""
    assert type(ours) is type(theirs)
    if isinstance(theirs, torch.Tensor):
        assert (ours.dtype, ours.device, ours.shape) == (theirs.dtype, theirs.device, theirs.shape)
        assert torch.equal(ours, theirs)
    else:
        assert ours == theirs


# The ways callers pass a timestep: diffusers' previous_timestep returns `timestep - 1` in the same type.
TIMESTEP_FORMS = {"int": int, "0-d tensor": torch.tensor, "1-element tensor": lambda t: torch.tensor([t]),
                  "numpy int": np.int64, "float": float}


def set_schedule(schedulers, schedule):
    """Give each scheduler the same schedule: every training timestep, 13 spaced steps, or custom timesteps."""
    for scheduler in schedulers:
        if schedule == "spaced":
            scheduler.set_timesteps(13)
        elif schedule == "custom":
            scheduler.set_timesteps(timesteps=[950, 400, 30, 3])


@pytest.mark.parametrize("schedule", ["every training timestep", "spaced", "custom"])
@pytest.mark.parametrize("form", list(TIMESTEP_FORMS))
def test_previous_timestep_returns_diffusers_types(schedule, form):
    ours, theirs = both()
    set_schedule((ours, theirs), schedule)
    for t in theirs.timesteps[:2].tolist() + theirs.timesteps[-2:].tolist():
        timestep = TIMESTEP_FORMS[form](t)
        assert_same_value_and_type(ours.previous_timestep(timestep), theirs.previous_timestep(timestep))
    if schedule != "every training timestep":
        # diffusers' own test_custom_timesteps calls .item() on the result.
        assert [ours.previous_timestep(t).item() for t in ours.timesteps] == ours.timesteps[1:].tolist() + [-1]


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("schedule", ["every training timestep", "spaced", "custom"])
def test_get_variance_matches_diffusers(variance_type, schedule):
    ours, theirs = both(variance_type=variance_type)
    set_schedule((ours, theirs), schedule)
    generator = torch.Generator().manual_seed(0)
    # A learned variance is positive; a learned_range output interpolates in [-1, 1].
    predicted_variances = {"learned": torch.rand(2, 1, 3, 3, generator=generator) * 0.02,
                           "learned_range": torch.rand(2, 1, 3, 3, generator=generator) * 2 - 1}
    for t in theirs.timesteps[:2].tolist() + theirs.timesteps[-2:].tolist():
        for asked_type in (None, *VARIANCE_TYPES):  # the config's type, then each type passed explicitly
            predicted_variance = predicted_variances.get(asked_type or variance_type)
            ours_value = ours._get_variance(t, predicted_variance=predicted_variance, variance_type=asked_type)
            theirs_value = theirs._get_variance(t, predicted_variance=predicted_variance, variance_type=asked_type)
            assert_identical(ours_value, theirs_value)
            assert ours_value.dtype == theirs_value.dtype and ours_value.shape == theirs_value.shape
            # A 0-d tensor timestep, as pipelines pass it, gives the same.
            assert_identical(ours._get_variance(torch.tensor(t), predicted_variance, asked_type), theirs_value)


def test_get_variance_reproduces_diffusers_golden_numbers():
    # diffusers' test_variance (tests/schedulers/test_scheduler_ddpm.py), with its tolerance.
    scheduler = DDPMScheduler(**GOLDEN_CONFIG)
    for t, expected in ((0, 0.0), (487, 0.00979), (999, 0.02)):
        assert torch.sum(torch.abs(scheduler._get_variance(t) - expected)) < 1e-5


@pytest.mark.parametrize("variance_type", [v for v in VARIANCE_TYPES if v not in LEARNED_VARIANCE_TYPES])
def test_step_noise_and_variance_forms_give_the_papers_sigma(variance_type):
    # sigma_t^2 = beta~_t ("small") or beta_t ("large"), section 3.2, worked out here in float64. At t = 10 the two
    # sigmas differ by 7%; the scheduler's float32 1 - alpha-bar_t near 0.0014 is off by up to ~5e-5 relative.
    scheduler = DDPMScheduler(variance_type=variance_type, prediction_type="sample", clip_sample=False)
    t, alpha_bar = 10, scheduler.alphas_cumprod.double()
    beta_t = 1 - alpha_bar[t] / alpha_bar[t - 1]
    sigma_squared = beta_t if "large" in variance_type else (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]) * beta_t
    # With x_0 predicted as 0 and no clipping, step() returns sigma_t * z: divide z out to read sigma_t.
    zeros = torch.zeros(1, 1, 4, 4)
    step = scheduler.step(zeros, t, zeros, generator=torch.Generator().manual_seed(3)).prev_sample
    noise = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    sigma = (step / noise).double()
    torch.testing.assert_close(sigma, torch.full_like(sigma, sigma_squared.sqrt().item()), rtol=2e-4, atol=0)
    # VARIANCE_FORMS says how reverse_variance (diffusers' _get_variance) holds that sigma_t.
    variance = scheduler.reverse_variance(t).item()
    to_sigma = {"variance": math.sqrt, "std": lambda std: std, "log_variance": lambda log: math.exp(0.5 * log)}
    assert to_sigma[VARIANCE_FORMS[variance_type]](variance) == pytest.approx(sigma_squared.sqrt().item(), rel=2e-4)


@pytest.mark.parametrize("variance_type", LEARNED_VARIANCE_TYPES)
def test_get_variance_of_a_learned_type_needs_the_prediction(variance_type):
    with pytest.raises(ValueError, match=f"variance_type '{variance_type}' needs the model's predicted_variance"):
        DDPMScheduler(variance_type=variance_type)._get_variance(500)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_threshold_sample_matches_diffusers(dtype):
    ours, theirs = both(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.7)
    pred_original_sample = (torch.randn(3, 2, 5, 4) * 2).to(dtype)
    thresholded = ours._threshold_sample(sample=pred_original_sample)
    assert_identical(thresholded, theirs._threshold_sample(sample=pred_original_sample))
    assert thresholded.dtype == dtype and not torch.equal(thresholded, pred_original_sample)


@pytest.mark.parametrize("variance_type", SHARED_VARIANCE_TYPES)
def test_step_tuple_and_output_forms_match_diffusers(variance_type):
    ours, theirs = both(variance_type=variance_type)
    sample = torch.randn(2, 1, 4, 4)
    model_output = model_output_for(ours, sample, seed=1)
    for return_dict in (False, True):
        ours_out = ours.step(model_output, 500, sample, torch.Generator().manual_seed(0), return_dict=return_dict)
        theirs_out = theirs.step(model_output, 500, sample, torch.Generator().manual_seed(0), return_dict=return_dict)
        if return_dict:
            assert list(ours_out.keys()) == list(theirs_out.keys()) == ["prev_sample", "pred_original_sample"]
            ours_out, theirs_out = ours_out.to_tuple(), theirs_out.to_tuple()
        assert type(ours_out) is type(theirs_out) is tuple and len(ours_out) == len(theirs_out) == 2
        for ours_tensor, theirs_tensor in zip(ours_out, theirs_out):
            assert_identical(ours_tensor, theirs_tensor)


# --- Bad input: one clear ValueError, where diffusers crashes, misbehaves or accepts nonsense --------------------


@pytest.mark.parametrize("option, valid", [("beta_schedule", BETA_SCHEDULES), ("variance_type", VARIANCE_TYPES),
                                           ("prediction_type", PREDICTION_TYPES),
                                           ("timestep_spacing", TIMESTEP_SPACINGS)])
def test_unknown_option_raises_at_construction_naming_the_choices(option, valid):
    with pytest.raises(ValueError) as error:
        DDPMScheduler(**{option: "bogus"})
    message = str(error.value)
    assert option in message and "'bogus'" in message
    assert all(name in message for name in valid)


@pytest.mark.parametrize("config, fragment", [
    (dict(num_train_timesteps=0), "num_train_timesteps must be at least 1"),
    (dict(num_train_timesteps=2.5), "num_train_timesteps must be an integer"),
    (dict(steps_offset=-1), "steps_offset must be 0 or more"),
    (dict(beta_start=-0.1), "must be >= 0"),
    (dict(dynamic_thresholding_ratio=1.5), "quantile in (0, 1]"),
    (dict(num_train_timesteps=10, trained_betas=[0.1] * 9), "trained_betas must be a list of num_train_timesteps=10"),
])
def test_bad_construction_raises(config, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        DDPMScheduler(**config)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(num_inference_steps=0), "between 1 and num_train_timesteps=1000, got 0"),  # diffusers: ZeroDivisionError
    (dict(num_inference_steps=-3), "between 1 and num_train_timesteps=1000, got -3"),  # diffusers: empty schedule
    (dict(num_inference_steps=1001), "between 1 and num_train_timesteps=1000, got 1001"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer"),
    (dict(), "pass exactly one of num_inference_steps"),
    (dict(num_inference_steps=5, timesteps=[4, 3, 2, 1, 0]), "pass exactly one of num_inference_steps"),
    (dict(timesteps=[100, 87, 50, 51, 0]), "strictly descending"),
    (dict(timesteps=[100, 100, 0]), "strictly descending"),
    (dict(timesteps=[1000, 10]), "must lie in 0..999"),
    (dict(timesteps=[10, -1]), "must lie in 0..999"),
    (dict(timesteps=[]), "non-empty"),
    (dict(timesteps=[10.5, 3]), "must be integers"),
    (dict(timesteps=[float("inf"), 3]), "must be integers"),
])
def test_bad_set_timesteps_raises(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        DDPMScheduler().set_timesteps(**kwargs)


def test_leading_offset_past_the_end_raises():
    scheduler = DDPMScheduler(num_train_timesteps=10, steps_offset=1)
    scheduler.set_timesteps(9)  # 8 * 1 + 1 = 9 is still a training timestep
    with pytest.raises(ValueError, match="past the last training timestep 9"):
        scheduler.set_timesteps(10)


@pytest.mark.parametrize("variance_type, model_channels, timestep, fragment", [
    ("fixed_small", 1, 1000, "timestep must lie in 0..999, got 1000"),
    ("fixed_small", 1, torch.tensor([3, 4]), "timestep must be a single integer"),
    ("fixed_small", 1, 3.5, "timestep must be an integer"),
    ("fixed_small", 2, 500, "must match sample of shape (2, 1, 4, 4)"),
    ("learned_range", 1, 500, "needs model_output with 2 x 1 channels"),
    ("learned", 3, 500, "needs model_output with 2 x 1 channels"),
])
def test_bad_step_raises(variance_type, model_channels, timestep, fragment):
    scheduler = DDPMScheduler(variance_type=variance_type)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        scheduler.step(torch.zeros(2, model_channels, 4, 4), timestep, torch.zeros(2, 1, 4, 4))


def test_step_off_the_schedule_raises():
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 901 is not in the schedule set by set_timesteps"):
        scheduler.step(torch.zeros(1, 1, 2, 2), 901, torch.zeros(1, 1, 2, 2))


FINITE_OPTIONS = ("beta_start", "beta_end", "clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value")


@pytest.mark.parametrize("option", FINITE_OPTIONS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_non_finite_option_raises_one_line_naming_it(option, value):
    with pytest.raises(ValueError, match=f"^{option} must be a finite number, got [-a-z]+$"):
        DDPMScheduler(**{option: value})


@pytest.mark.parametrize("option", FINITE_OPTIONS)
def test_numpy_numbers_for_float_options_are_accepted_like_diffusers(option):
    value = np.float32(DDPMScheduler().config[option] * 0.9)  # a valid value, as a numpy scalar
    ours, theirs = both(**{option: value})
    for name in ("betas", "alphas_cumprod"):
        assert_identical(getattr(ours, name), getattr(theirs, name))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), 1e39])  # 1e39 overflows float32 to inf
def test_non_finite_trained_betas_raise_naming_the_first(bad_value):
    trained_betas = [0.01] * 10
    trained_betas[6] = trained_betas[8] = bad_value
    with pytest.raises(ValueError, match=r"^trained_betas must be finite float32 numbers, got (nan|inf) at index 6 "
                                         r"\(2 of 10 not finite\)$"):
        DDPMScheduler(num_train_timesteps=10, trained_betas=trained_betas)


@pytest.mark.parametrize("length", [9, 11])
def test_trained_betas_of_the_wrong_length_say_what_to_pass(length):
    trained_betas = np.linspace(0.01, 0.2, length)
    with pytest.raises(ValueError) as error:
        DDPMScheduler(num_train_timesteps=10, trained_betas=trained_betas)
    assert str(error.value) == (f"trained_betas must be a list of num_train_timesteps=10 numbers, got shape ({length},)"
                                f"; to use them all, pass num_train_timesteps=len(trained_betas)={length}")
    # Following the advice builds the scheduler diffusers builds.
    ours, theirs = both(num_train_timesteps=length, trained_betas=trained_betas)
    assert_identical(ours.alphas_cumprod, theirs.alphas_cumprod)
    with pytest.raises(ValueError, match=r"got shape \(2, 5\)$"):  # no length advice for a table
        DDPMScheduler(num_train_timesteps=10, trained_betas=np.full((2, 5), 0.01))


def test_why_a_length_mismatch_is_refused_diffusers_misbehaves_later():
    sample = torch.zeros(1, 1, 2, 2)
    # Too few betas: diffusers builds the scheduler, lists timestep 9 first, and fails on it when sampling.
    short = Reference(num_train_timesteps=10, trained_betas=[0.1] * 9)
    assert short.timesteps[0] == 9 and len(short) == 10
    with pytest.raises(IndexError):
        short.step(sample, short.timesteps[0], sample)
    # Too many: the extra betas are silently unused, so rescale_betas_zero_snr misses zero SNR at the last timestep.
    long = Reference(num_train_timesteps=10, trained_betas=np.linspace(0.01, 0.2, 11), rescale_betas_zero_snr=True)
    assert long.alphas_cumprod[len(long) - 1] > 0
