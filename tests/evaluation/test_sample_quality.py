"""The sample-quality Evaluator (ddpm_fashion/evaluation/sample_quality.py) on the real test set: it must rank degraded
images worse, crop generated images to the data, and refuse images it cannot score."""

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from conftest import NUM_IMAGES

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_real_training_images_score_close_to_the_test_set_and_noise_far_from_it(evaluator, real_images):
    real = evaluator.evaluate(real_images)
    noise = evaluator.evaluate(torch.rand(NUM_IMAGES, 1, 28, 28))
    assert 0 <= real["fid"] < 2.0
    assert noise["fid"] > 50 * real["fid"]
    assert real["precision"] > 0.7 and real["recall"] > 0.7
    # Noise images all land on one spot of feature space; k-NN precision counts it as "real" if that spot falls in
    # the ball of an outlying real image (the weakness Naeem et al. 2020 address), so precision stays above 0.
    assert noise["precision"] < 0.3 and noise["recall"] < 0.05
    assert real["class_kl_from_uniform"] < 0.01  # the classes of real images are balanced
    assert noise["class_kl_from_uniform"] > 0.5  # noise is not a garment, whatever class it is forced into


def _fid_ladder(evaluator, images, degrade, strengths):
    """FID of images degraded at each strength."""
    return [evaluator.evaluate(degrade(images, strength))["fid"] for strength in strengths]


def test_fid_rises_monotonically_with_gaussian_noise(evaluator, real_images):
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(real_images.shape, generator=generator)
    fids = _fid_ladder(evaluator, real_images, lambda x, sigma: (x + sigma * noise).clamp(0, 1),
                       (0.0, 0.05, 0.1, 0.2, 0.4))
    assert all(lower < higher for lower, higher in zip(fids, fids[1:])), fids


def test_fid_rises_monotonically_with_blur(evaluator, real_images):
    fids = _fid_ladder(evaluator, real_images,
                       lambda x, sigma: gaussian_blur(x, kernel_size=9, sigma=sigma) if sigma else x,
                       (0.0, 0.6, 1.0, 1.5, 2.5))
    assert all(lower < higher for lower, higher in zip(fids, fids[1:])), fids


def test_generated_32px_images_are_cropped_to_the_data_before_scoring(evaluator, real_images):
    padded = torch.nn.functional.pad(real_images, (2, 2, 2, 2))  # [N, 1, 32, 32], as the model generates them
    assert evaluator.evaluate(padded)["fid"] == pytest.approx(evaluator.evaluate(real_images)["fid"], rel=1e-6)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(20, 3, 28, 28), "grey"),
    (torch.rand(20, 1, 30, 30), "grey"),
    (torch.rand(20, 1, 28, 28) * 2, r"\[0, 1\]"),
    (torch.rand(5, 1, 28, 28), "at least"),
])
def test_bad_images_are_refused(evaluator, bad, message):
    with pytest.raises(ValueError, match=message):
        evaluator.evaluate(bad)
