"""The training objective: the timesteps a batch is trained at, what the network predicts, how each error counts.

Ho et al. (2020) train at uniform timesteps on the unweighted eps error (their L_simple, eq. 14). Two levers from
later work are options here: min-SNR-gamma weighting (Hang et al. 2023), which caps the weight of the easy
low-noise timesteps (optionally with a floor, so that they are not left almost untrained), and stratified
timesteps, which spread one batch evenly over [0, T) to lower the loss
variance without changing its expectation.
"""

import torch
from diffusers.training_utils import compute_snr

TIMESTEP_SAMPLING = ("uniform", "stratified")


def sample_timesteps(kind, size, num_timesteps, generator, device):
    """Get `size` training timesteps in [0, num_timesteps): i.i.d. uniform, or one per equal stratum in random order."""
    if kind == "uniform":
        return torch.randint(0, num_timesteps, (size,), generator=generator, device=device)
    # Stratum i covers [i, i + 1) * T / size; a random permutation keeps every process's slice of the batch spread.
    strata = torch.randperm(size, generator=generator, device=device)
    position = torch.rand(size, generator=generator, device=device, dtype=torch.float64)
    return ((strata + position) * num_timesteps / size).long().clamp_(max=num_timesteps - 1)


def training_target(prediction_type, noise_scheduler, clean, noise, timesteps):
    """Get what the network learns to predict: eps (Ho et al. eq. 14), x_0, or v (Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return clean
    return noise_scheduler.get_velocity(clean, noise, timesteps)


def loss_weights(prediction_type, noise_scheduler, timesteps, snr_gamma, weight_floor=None):
    """Get each sample's loss weight: 1, or min-SNR-gamma (Hang et al. 2023) expressed for the target, with the
    capped timesteps' weights at least weight_floor if given.

    The paper weights the x_0 error by min(SNR_t, gamma), with SNR_t = alpha_bar_t / (1 - alpha_bar_t). The eps error
    is SNR_t times smaller than the x_0 error and the v error SNR_t + 1 times, hence the divisions. For eps and v
    that leaves the low-noise timesteps the cap acts on (SNR_t > gamma) a weight near gamma / SNR_t: 5e-4 at t = 0
    of the linear schedule, nearly untrained. The floor lifts only those; v's small weights at high noise
    (SNR_t / (SNR_t + 1), uncapped) are the paper's and stay.
    """
    if snr_gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    snr = compute_snr(noise_scheduler, timesteps)
    weights = snr.clamp(max=snr_gamma)
    if prediction_type == "epsilon":
        weights = weights / snr
    elif prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    if weight_floor is not None:
        weights = torch.where(snr > snr_gamma, weights.clamp(min=weight_floor), weights)
    return weights
