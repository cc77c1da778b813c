"""The training objective: timestep sampling, targets and min-SNR weights against diffusers' own formulas."""

import pytest
import torch
from diffusers import DDPMScheduler as LibraryDDPMScheduler
from diffusers.training_utils import compute_snr

from ddpm_fashion.schedulers.ddpm import DDPMScheduler
from ddpm_fashion.training.objective import loss_weights, sample_timesteps, training_target


def test_uniform_timesteps_are_the_plain_randint_stream():
    # Runs made before the option draw exactly what they drew then, so their resume stays bitwise exact.
    ours = sample_timesteps("uniform", 64, 1000, torch.Generator().manual_seed(3), "cpu")
    plain = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("size", [1, 7, 64, 1000, 1500])
def test_stratified_timesteps_put_one_sample_in_each_stratum(size):
    timesteps = sample_timesteps("stratified", size, 1000, torch.Generator().manual_seed(size), "cpu")
    assert timesteps.dtype == torch.long and 0 <= timesteps.min() and timesteps.max() <= 999
    # Sorted, the i-th timestep lies in stratum i = [i, i + 1) * T / size, floored to an integer timestep.
    ordered, i = timesteps.sort().values.double(), torch.arange(size, dtype=torch.float64)
    assert ((i * 1000 / size).floor() <= ordered).all() and (ordered < (i + 1) * 1000 / size).all()
    if size == 64:
        assert not torch.equal(timesteps, timesteps.sort().values)  # shuffled: each process's slice spans [0, T)


def test_stratified_timesteps_are_uniform_over_many_batches():
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.cat([sample_timesteps("stratified", 10, 1000, generator, "cpu") for _ in range(500)])
    assert torch.equal(torch.bincount(timesteps // 100, minlength=10), torch.full((10,), 500))  # one per tenth
    within = (timesteps % 100).float()  # where in its stratum: uniform, mean 49.5 (s.d. of the mean 0.4)
    assert abs(within.mean().item() - 49.5) < 2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_diffusers_training_scripts(prediction_type):
    ours = DDPMScheduler(num_train_timesteps=1000)
    library = LibraryDDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.arange(0, 1000, 37)
    # diffusers' examples/text_to_image/train_text_to_image.py, min-SNR branch
    snr = compute_snr(library, timesteps)
    expected = torch.stack([snr, 5.0 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        expected = expected / snr
    elif prediction_type == "v_prediction":
        expected = expected / (snr + 1)
    weights = loss_weights(prediction_type, ours, timesteps, 5.0)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    if prediction_type == "epsilon":
        assert weights[0] < 0.01 and weights[-1] == 1  # the easy low-noise steps count least; the noisy ones fully


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_weight_floor_lifts_only_the_capped_timesteps_below_it(prediction_type):
    scheduler, timesteps = DDPMScheduler(num_train_timesteps=1000), torch.arange(1000)
    plain = loss_weights(prediction_type, scheduler, timesteps, 5.0)
    floored = loss_weights(prediction_type, scheduler, timesteps, 5.0, weight_floor=0.1)
    lifted = (plain < 0.1) & (compute_snr(scheduler, timesteps) > 5.0)
    assert lifted[0] and plain[0] < 0.001  # min-SNR leaves t = 0 almost untrained
    assert 10 < lifted.sum() < 100 and torch.all(lifted[:lifted.sum()])  # t = 0, 1, ...: the lowest noise only
    assert torch.all(floored[lifted] == 0.1) and torch.equal(floored[~lifted], plain[~lifted])
    if prediction_type == "v_prediction":  # v's weight near 0 at high noise is the paper's: not lifted
        assert plain[-1] < 0.001 and floored[-1] == plain[-1]


def test_without_snr_gamma_every_sample_counts_the_same():
    weights = loss_weights("epsilon", DDPMScheduler(), torch.tensor([0, 500, 999]), None)
    assert torch.equal(weights, torch.ones(3))


def test_targets_match_the_library_scheduler():
    clean, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    timesteps = torch.tensor([0, 10, 500, 999])
    ours, library = DDPMScheduler(), LibraryDDPMScheduler()
    assert training_target("epsilon", ours, clean, noise, timesteps) is noise
    assert training_target("sample", ours, clean, noise, timesteps) is clean
    torch.testing.assert_close(training_target("v_prediction", ours, clean, noise, timesteps),
                               library.get_velocity(clean, noise, timesteps), rtol=1e-6, atol=1e-7)
