"""ddpm_fashion/evaluation/features.py: the Inception extractor computes torchmetrics' features and refuses weights
files it cannot read safely."""

from fractions import Fraction

import pytest
import torch

from ddpm_fashion.evaluation import features

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_inception_weights_that_are_not_a_plain_state_dict_are_refused_unread(tmp_path):
    pickled = tmp_path / "weights.pth"
    torch.save({"conv": torch.zeros(1), "payload": Fraction(1, 3)}, pickled)  # only full unpickling can read it
    with pytest.raises(ValueError, match="tensors-only state dict"):
        features.InceptionFeatures(str(pickled))
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"conv": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="does not hold FID InceptionV3 weights"):
        features.InceptionFeatures(str(wrong))


def test_inception_features_equal_torchmetrics_standard_extractor(tmp_path, monkeypatch):
    """With any weights (random here: the real ones need the internet), our path computes torchmetrics' features."""
    from safetensors.torch import save_file
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity
    from torchmetrics.image.fid import NoTrainInceptionV3

    torch.manual_seed(0)
    with monkeypatch.context() as patch:  # build torchmetrics' extractor with random weights, no weights file
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        library = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])  # FID's default settings
    weights = tmp_path / "inception.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in library.state_dict().items()}, weights)

    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    ours = features.InceptionFeatures(str(weights))
    assert ours.num_features == 2048 and "antialias=True" in ours.description
    torch.testing.assert_close(ours(images), library(images.repeat(1, 3, 1, 1)), rtol=0, atol=0)
