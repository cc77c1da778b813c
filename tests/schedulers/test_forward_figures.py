"""ddpm_fashion/schedulers/forward_figures.py: the noised images and schedule curves of the forward-process figure."""

import pytest
import torch
from diffusers import DDPMScheduler as LibraryDDPMScheduler

from ddpm_fashion.schedulers.ddpm import DDPMScheduler
from ddpm_fashion.schedulers.forward_figures import SCHEDULES, noised_images, one_per_class, schedule_curves

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_noised_images_follow_q_xt_given_x0(real_data_dir):
    from ddpm_fashion.data import load_fashion_mnist

    images, labels = load_fashion_mnist("test", real_data_dir)
    chosen = one_per_class(labels)
    assert labels[chosen].tolist() == list(range(10))
    clean = images[chosen].float() / 255
    noisy = torch.from_numpy(noised_images(images[chosen], (0, 999), DDPMScheduler(), seed=0))
    assert noisy.shape == (10, 2, 28, 28)
    # t = 0 keeps the image (beta_1 = 1e-4); at t = 999 almost nothing of it is left (alpha-bar = 4e-5).
    assert (noisy[:, 0] - clean).abs().max() < 0.05
    correlation = torch.corrcoef(torch.stack([noisy[:, 1].flatten(), clean.flatten()]))[0, 1]
    assert abs(correlation) < 0.05


def test_schedule_curves_are_the_library_schedules():
    curves = schedule_curves(1000)
    assert list(curves) == ["linear", "cosine", "sigmoid"]
    for name, (alpha_bar, snr) in curves.items():
        expected = LibraryDDPMScheduler(beta_schedule=SCHEDULES[name]).alphas_cumprod.double().numpy()
        assert (alpha_bar == expected).all()
        assert (snr[1:] < snr[:-1]).all()  # signal-to-noise falls at every step
        assert abs(snr[500] - expected[500] / (1 - expected[500])) < 1e-12
