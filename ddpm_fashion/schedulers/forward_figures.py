"""The pictures DDPM tutorials draw: real images noised by q(x_t | x_0), and alpha-bar_t / SNR of three schedules."""

from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure

from ddpm_fashion.data import CLASS_NAMES, crop_to_28, to_model_input
from ddpm_fashion.guards.inputs import MAX_SEED, check_int
from ddpm_fashion.sampling.pictures import to_unit_range
from ddpm_fashion.schedulers.ddpm import DDPMScheduler

FORWARD_TIMESTEPS = (0, 50, 100, 250, 500, 750, 999)
# Display name -> diffusers beta_schedule; beta_start/beta_end are the DDPM defaults (the cosine one ignores them).
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}


def one_per_class(labels: torch.Tensor) -> torch.Tensor:
    """Get the index of the first image of each class, in class order (classes absent from labels are skipped)."""
    firsts = [torch.nonzero(labels == label)[0, 0] for label in range(len(CLASS_NAMES)) if (labels == label).any()]
    return torch.stack(firsts)


def noised_images(images_uint8: torch.Tensor, timesteps: Sequence[int], scheduler: DDPMScheduler, seed: int = 0):
    """Get x_t ~ q(x_t | x_0) for every image and timestep, one noise draw per image, as [R, T, 28, 28] in [0, 1]."""
    check_int("seed", seed, 0, MAX_SEED)
    x0 = to_model_input(images_uint8)  # (R, 1, 32, 32) in [-1, 1]
    # The same epsilon for every t, so a row shows one path of the image dissolving into noise.
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows = len(x0)
    x0 = x0.repeat_interleave(len(timesteps), dim=0)  # (R*T, 1, 32, 32), each image T times
    noise = noise.repeat_interleave(len(timesteps), dim=0)
    t = torch.tensor(list(timesteps)).repeat(rows)  # (R*T,) = 0, 50, ..., 999, 0, 50, ...
    noisy = to_unit_range(crop_to_28(scheduler.add_noise(x0, noise, t)))  # (R*T, 1, 28, 28)
    return noisy.reshape(rows, len(timesteps), *noisy.shape[-2:]).numpy()  # (R, T, 28, 28)


def schedule_curves(num_train_timesteps: int = 1000) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Get alpha-bar_t and SNR_t = alpha-bar_t / (1 - alpha-bar_t) for each schedule in SCHEDULES."""
    curves = {}
    for name, beta_schedule in SCHEDULES.items():
        alpha_bar = DDPMScheduler(num_train_timesteps, beta_schedule=beta_schedule).alphas_cumprod.double().numpy()
        curves[name] = (alpha_bar, alpha_bar / (1 - alpha_bar))
    return curves


def forward_process_figure(images_uint8: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> Figure:
    """Get the figure: images noised at FORWARD_TIMESTEPS (one row each) beside alpha-bar_t and SNR per schedule."""
    scheduler = DDPMScheduler()  # the linear schedule of Ho et al., the one the model is trained with
    noisy = noised_images(images_uint8, FORWARD_TIMESTEPS, scheduler, seed)
    rows, columns = noisy.shape[:2]

    figure = Figure(figsize=(6.5 + 0.85 * columns, 0.9 * rows + 1.2), layout="constrained")
    images_panel, curves_panel = figure.subfigures(1, 2, width_ratios=[0.85 * columns, 5.5])
    images_panel.suptitle(r"Forward process $q(x_t \mid x_0)$, linear schedule")
    grid = images_panel.subplots(rows, columns, squeeze=False)
    for row in range(rows):
        for column in range(columns):
            axis = grid[row, column]
            axis.imshow(noisy[row, column], cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"t = {FORWARD_TIMESTEPS[column]}", fontsize=9)
            if column == 0:
                axis.set_ylabel(CLASS_NAMES[int(labels[row])], fontsize=8)

    num_train_timesteps = scheduler.config.num_train_timesteps
    curves_panel.suptitle(f"Noise schedules (T = {num_train_timesteps})")
    alpha_axis, snr_axis = curves_panel.subplots(2, 1, sharex=True)
    for name, (alpha_bar, snr) in schedule_curves(num_train_timesteps).items():
        timesteps = np.arange(len(alpha_bar))
        alpha_axis.plot(timesteps, alpha_bar, label=name)
        snr_axis.plot(timesteps, snr, label=name)
    alpha_axis.set_ylabel(r"$\bar\alpha_t$ (signal kept)")
    alpha_axis.legend()
    snr_axis.set_yscale("log")
    snr_axis.set_ylabel(r"SNR $= \bar\alpha_t / (1 - \bar\alpha_t)$")
    snr_axis.set_xlabel("timestep t")
    for axis in (alpha_axis, snr_axis):
        axis.grid(alpha=0.3)
    return figure
