"""ddpm_fashion/evaluation/metrics.py: the Frechet distance against torchmetrics' FID, and the class histogram's KL
divergence from uniform."""

import math

import pytest
import torch

from ddpm_fashion.evaluation import features, metrics
from ddpm_fashion.sampling import pictures

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_frechet_distance_is_torchmetrics_fid_on_the_extractor(evaluator, real_images):
    from torchmetrics.image.fid import FrechetInceptionDistance

    images = pictures.to_uint8_images(real_images[:300])
    library = FrechetInceptionDistance(feature=evaluator.extractor)  # torchmetrics runs the extractor itself
    library.update(pictures.to_uint8_images(real_images[300:700]), real=True)
    library.update(images, real=False)
    ours = metrics.frechet_distance(features.extract_features(evaluator.extractor, images),
                                     features.extract_features(evaluator.extractor,
                                                               pictures.to_uint8_images(real_images[300:700])))
    assert ours == pytest.approx(library.compute().item(), rel=1e-5)


def test_class_histogram_and_its_kl_from_uniform():
    balanced = metrics.class_histogram(torch.arange(100) % 10)
    assert balanced.tolist() == [0.1] * 10
    assert metrics.kl_from_uniform(balanced) == pytest.approx(0.0, abs=1e-12)
    single = metrics.class_histogram(torch.full((7,), 3))
    assert metrics.kl_from_uniform(single) == pytest.approx(math.log(10))
    halves = metrics.class_histogram(torch.tensor([6, 8]))  # half "Shirt", half "Bag"
    assert metrics.kl_from_uniform(halves) == pytest.approx(math.log(5))
