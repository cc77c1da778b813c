"""ddpm_fashion/evaluation/reference_cache.py: the reference set's features are cached by extractor, split and data,
recomputed when damaged, and never written into the shipped weights."""

import pytest
import torch

from ddpm_fashion.data import load_fashion_mnist
from ddpm_fashion.evaluation.reference_cache import reference_features

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_reference_features_are_cached_by_extractor_split_and_data(evaluator, real_data_dir, reference_cache):
    files = sorted(reference_cache.glob("reference-*.safetensors"))
    assert [path.name.split("-")[1] for path in files] == ["fmnist"]
    assert f"-{evaluator.reference_split}-" in files[0].name
    cached = reference_features(evaluator.extractor, "test", real_data_dir, cache=reference_cache)
    assert torch.equal(cached, evaluator.reference)
    test_images = len(load_fashion_mnist("test", real_data_dir)[0])
    assert evaluator.reference.shape == (test_images, evaluator.extractor.num_features)
    # A damaged cache file is recomputed and replaced, never trusted.
    files[0].write_bytes(b"not safetensors")
    recomputed = reference_features(evaluator.extractor, "test", real_data_dir, cache=reference_cache)
    torch.testing.assert_close(recomputed, evaluator.reference, rtol=1e-5, atol=1e-5)
    assert not any(path.name.startswith(".") for path in reference_cache.iterdir())


def test_a_reference_cache_inside_the_shipped_weights_is_not_written(evaluator, real_data_dir, capsys):
    from ddpm_fashion.evaluation.classifier import WEIGHTS_DIR

    before = sorted(path.name for path in WEIGHTS_DIR.iterdir())
    features = reference_features(evaluator.extractor, "test", real_data_dir, cache=WEIGHTS_DIR)
    torch.testing.assert_close(features, evaluator.reference, rtol=1e-5, atol=1e-5)
    assert sorted(path.name for path in WEIGHTS_DIR.iterdir()) == before
    assert "not caching reference features" in capsys.readouterr().err
