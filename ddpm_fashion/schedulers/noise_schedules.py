"""The noise schedules a DDPM can train with: beta_1 ... beta_T, as diffusers' DDPMScheduler names them.

Each builder takes (num_train_timesteps, beta_start, beta_end) and returns float32 betas computed exactly as
diffusers computes them, so the two schedulers agree bit for bit (tests/test_scheduler.py).
"""

import math
from typing import Callable

import torch

# Largest beta a schedule built from alpha-bar may use: beta = 1 would wipe the signal in one step.
MAX_ALPHA_BAR_BETA = 0.999


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Get betas rising linearly from beta_start to beta_end, the schedule of Ho et al. (section 4)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Get betas whose square roots rise linearly, the schedule of latent diffusion (Stable Diffusion)."""
    sqrt_betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32)
    return sqrt_betas**2


def sigmoid_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Get betas following a sigmoid over [-6, 6] from beta_start to beta_end, the GeoDiff schedule."""
    ramp = torch.linspace(-6, 6, num_train_timesteps)
    return torch.sigmoid(ramp) * (beta_end - beta_start) + beta_start


def cosine_alpha_bar(time: float) -> float:
    """Get alpha-bar at time in [0, 1] for the cosine schedule (Nichol & Dhariwal 2021, eq. 17, s = 0.008)."""
    return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2


def laplace_alpha_bar(time: float) -> float:
    """Get alpha-bar at time in [0, 1] for a schedule whose log-SNR follows a Laplace distribution."""
    log_snr = -0.5 * math.copysign(1, 0.5 - time) * math.log(1 - 2 * math.fabs(0.5 - time) + 1e-6)
    snr = math.exp(log_snr)
    return math.sqrt(snr / (1 + snr))


def betas_from_alpha_bar(num_train_timesteps: int, alpha_bar: Callable[[float], float]) -> torch.Tensor:
    """Get the betas that make alpha-bar_t follow a continuous alpha_bar(time), beta_t = 1 - abar(t+1)/abar(t)."""
    # Python floats (float64) throughout, rounded to float32 once at the end, as diffusers does.
    betas = []
    for step in range(num_train_timesteps):
        start, end = step / num_train_timesteps, (step + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(end) / alpha_bar(start), MAX_ALPHA_BAR_BETA))
    return torch.tensor(betas, dtype=torch.float32)


def squaredcos_cap_v2_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Get the cosine-schedule betas (improved DDPM); beta_start and beta_end play no part."""
    return betas_from_alpha_bar(num_train_timesteps, cosine_alpha_bar)


def laplace_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Get the Laplace-schedule betas; beta_start and beta_end play no part."""
    return betas_from_alpha_bar(num_train_timesteps, laplace_alpha_bar)


BETA_SCHEDULES = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "squaredcos_cap_v2": squaredcos_cap_v2_betas,
    "sigmoid": sigmoid_betas,
    "laplace": laplace_betas,
}


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Get betas rescaled so the last timestep is pure noise (zero SNR), Algorithm 1 of Lin et al. 2023."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    # Shift so the last value is 0, then scale so the first keeps its old value.
    sqrt_alpha_bar = sqrt_alpha_bar - last
    sqrt_alpha_bar = sqrt_alpha_bar * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])  # undo the cumulative product
    return 1 - alphas


def trained_betas_tensor(trained_betas, num_train_timesteps: int) -> torch.Tensor:
    """Get trained_betas as float32 betas, or raise a ValueError unless they are num_train_timesteps finite numbers."""
    betas = torch.tensor(trained_betas, dtype=torch.float32)
    if betas.shape != (num_train_timesteps,):
        # diffusers accepts any length: too few betas fail later, when a timestep indexes past the last one, and
        # extra ones are silently left unused (docs/own-vs-library.md).
        hint = f"; to use them all, pass num_train_timesteps=len(trained_betas)={len(betas)}" if betas.ndim == 1 else ""
        raise ValueError(
            f"trained_betas must be a list of num_train_timesteps={num_train_timesteps} numbers, "
            f"got shape {tuple(betas.shape)}{hint}"
        )
    not_finite = torch.nonzero(~torch.isfinite(betas)).flatten()
    if len(not_finite) > 0:
        index = not_finite[0].item()
        raise ValueError(
            f"trained_betas must be finite float32 numbers, got {betas[index].item()} at index {index} "
            f"({len(not_finite)} of {num_train_timesteps} not finite)"
        )
    return betas
