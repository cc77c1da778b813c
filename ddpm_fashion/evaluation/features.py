"""Feature extractors for FID and precision/recall: modules mapping uint8 [N, 1, 28, 28] images to float [N, D].

`fmnist` (default, offline) are the pooled penultimate activations of the shipped FashionMNIST classifier
(ddpm_fashion/evaluation/classifier.py); `inception` are torchmetrics' standard 2048-d InceptionV3 pool features of
the grey image repeated to three channels, resized to 299x299 with torchmetrics' default antialias. Each extractor
carries a cache key (what its features depend on) and a description for reports.
"""

import importlib.util
import io
import pickle
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torchmetrics.image.fid import NoTrainInceptionV3

from ddpm_fashion.data import _hub_is_offline
from ddpm_fashion.evaluation.classifier import WEIGHTS_DIR, WEIGHTS_FILE, features_and_logits, load_classifier
from ddpm_fashion.guards.files import sha256_of_file
from ddpm_fashion.guards.inputs import one_line, require_choice

FEATURE_CHOICES = ("fmnist", "inception")
DEFAULT_BATCH_SIZE = 256

# torchmetrics resizes to 299x299 with antialiasing by default; the original TensorFlow FID did not, so numbers
# from the two differ slightly. The report states which was used.
INCEPTION_ANTIALIAS = True
INCEPTION_FEATURES = 2048
# torch-fidelity's file name for the FID InceptionV3 weights (converted from TensorFlow's 2015-12-05 release).
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
# torchmetrics[image] brings torch-fidelity: its InceptionV3 for `inception` features, and precision/recall.
TORCH_FIDELITY_AVAILABLE = importlib.util.find_spec("torch_fidelity") is not None
INSTALL_TORCH_FIDELITY = "pip install 'torch-fidelity>=0.4'"
HOW_TO_GET_INCEPTION = (f"download {INCEPTION_URL} on a machine with internet and pass its path as "
                        f"--inception_weights PATH (a .pth state dict or .safetensors)")

class ClassifierFeatures(nn.Module):
    """The FashionMNIST classifier's pooled penultimate activations (`fmnist` features)."""

    def __init__(self, classifier_dir=WEIGHTS_DIR):
        super().__init__()
        self.model = load_classifier(classifier_dir)
        self.num_features = self.model.config.hidden_sizes[-1]
        weights_hash = sha256_of_file(Path(classifier_dir) / WEIGHTS_FILE)[:12]
        self.cache_key = f"fmnist-{weights_hash}"
        self.description = (f"FashionMNIST classifier ({type(self.model).__name__}, {classifier_dir}, "
                            f"{WEIGHTS_FILE} sha256 {weights_hash}), {self.num_features}-d pooled penultimate "
                            f"features")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Get the features [N, D] of uint8 images [N, 1, 28, 28]."""
        features, _ = features_and_logits(self.model, images)
        return features


def _read_state_dict(path: Path) -> dict:
    """Read a tensors-only state dict from a .safetensors or .pth file, never unpickling arbitrary objects."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message suggests weights_only=False, which is never an option here
        raise ValueError(f"--inception_weights {path} is not a readable tensors-only state dict (torch.load with "
                         f"weights_only=True refused it); {HOW_TO_GET_INCEPTION}") from None
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError) as error:
        raise ValueError(f"--inception_weights {path} is not a readable tensors-only state dict "
                         f"({one_line(error)[:200]}); "
                         f"{HOW_TO_GET_INCEPTION}") from None


def _inception_weights(path: Optional[str]):
    """Get the FID InceptionV3 state dict and its file: from `path`, torch's hub cache, or a download when online."""
    if path is not None:
        weights_file = Path(path)
        if not weights_file.is_file():
            raise FileNotFoundError(f"--inception_weights {path} does not exist; {HOW_TO_GET_INCEPTION}")
        return _read_state_dict(weights_file), weights_file
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return _read_state_dict(cached), cached
    if _hub_is_offline():
        raise FileNotFoundError(f"InceptionV3 FID weights are not in {cached.parent} and downloads are off "
                                f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); {HOW_TO_GET_INCEPTION}")
    try:
        state_dict = torch.hub.load_state_dict_from_url(INCEPTION_URL, map_location="cpu", weights_only=True)
    except Exception as error:  # no network, a proxy, a truncated file: all mean the weights are unavailable
        raise FileNotFoundError(f"InceptionV3 FID weights could not be downloaded ({type(error).__name__}: "
                                f"{one_line(error)}); {HOW_TO_GET_INCEPTION}") from None
    return state_dict, cached


class InceptionFeatures(nn.Module):
    """torchmetrics' standard FID InceptionV3 2048-d pool features of grey images repeated to RGB (`inception`)."""

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        if not TORCH_FIDELITY_AVAILABLE:
            raise ValueError(f"--features inception needs torch-fidelity: {INSTALL_TORCH_FIDELITY}")
        state_dict, weights_file = _inception_weights(weights_path)
        # torch-fidelity unpickles its weights file with weights_only=False, so it never sees the user's file: it
        # gets an in-memory copy of the state dict that was read above with weights_only=True.
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        try:
            self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
                                                feature_extractor_weights_path=buffer, antialias=INCEPTION_ANTIALIAS)
        except RuntimeError as error:  # load_state_dict: missing or mis-shaped tensors
            raise ValueError(f"--inception_weights {weights_file} does not hold FID InceptionV3 weights "
                             f"({one_line(error)[:300]}); {HOW_TO_GET_INCEPTION}") from None
        self.num_features = INCEPTION_FEATURES
        weights_hash = sha256_of_file(weights_file)[:12]
        self.cache_key = f"inception{INCEPTION_FEATURES}-antialias{int(INCEPTION_ANTIALIAS)}-{weights_hash}"
        self.description = (f"InceptionV3 {INCEPTION_FEATURES}-d pool features (torchmetrics NoTrainInceptionV3, "
                            f"{weights_file.name} sha256 {weights_hash}), grey repeated to RGB, resized to 299x299 "
                            f"with antialias={INCEPTION_ANTIALIAS}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Get the features [N, 2048] of uint8 images [N, 1, 28, 28]."""
        return self.inception(images.expand(-1, 3, -1, -1))  # [N, 1, H, W] -> [N, 3, H, W], grey as RGB


def build_feature_extractor(features: str = "fmnist", inception_weights: Optional[str] = None) -> nn.Module:
    """Get the feature extractor named by --features, ready to run."""
    require_choice("features", features, FEATURE_CHOICES)
    if features == "fmnist":
        if inception_weights is not None:
            raise ValueError("--inception_weights only applies to --features inception")
        return ClassifierFeatures()
    return InceptionFeatures(inception_weights)


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE,
                     device="cpu") -> torch.Tensor:
    """Get the float32 features [N, D] of uint8 images [N, 1, 28, 28], batch by batch, on the CPU."""
    extractor.to(device).eval()
    return torch.cat([extractor(batch.to(device)).float().cpu() for batch in images.split(batch_size)])

