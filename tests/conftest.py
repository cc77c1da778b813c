"""Shared fixtures. Tests never touch the network: the Hub is switched off before anything imports it."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name):
    """Import benchmarks/<name>.py (a script folder, not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same global RNG state, so a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Small models run fastest on one thread, and then never fight other test processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def real_data_dir():
    """The Debian package's FashionMNIST folder, or a skip that says how to get it."""
    if not os.path.isdir(FASHION_MNIST_DEBIAN_DIR):
        pytest.skip(f"real FashionMNIST absent: apt-get install dataset-fashion-mnist puts it in {FASHION_MNIST_DEBIAN_DIR}")
    return FASHION_MNIST_DEBIAN_DIR


def write_idx(path, array, compress=True):
    """Write a numpy uint8 array as an IDX file (the FashionMNIST format), gzipped or raw."""
    import gzip
    import struct

    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_synthetic_fashion_mnist(folder, num_train=256, num_test=64, seed=0):
    """Four small IDX files with random images and balanced labels, laid out like the real data set."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for split, n in (("train", num_train), ("t10k", num_test)):
        write_idx(f"{folder}/{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(f"{folder}/{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return str(folder)


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory):
    """The real data when installed, otherwise small synthetic IDX files, so training tests always run."""
    if os.path.isdir(FASHION_MNIST_DEBIAN_DIR):
        return FASHION_MNIST_DEBIAN_DIR
    return write_synthetic_fashion_mnist(tmp_path_factory.mktemp("synthetic-fashion-mnist"))
