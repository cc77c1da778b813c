"""Shared fixtures. Tests never touch the network: the Hub is switched off before anything imports it."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same global RNG state, so a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture
def real_data_dir():
    """The Debian package's FashionMNIST folder, or a skip that says how to get it."""
    if not os.path.isdir(FASHION_MNIST_DEBIAN_DIR):
        pytest.skip(f"real FashionMNIST absent: apt-get install dataset-fashion-mnist puts it in {FASHION_MNIST_DEBIAN_DIR}")
    return FASHION_MNIST_DEBIAN_DIR
