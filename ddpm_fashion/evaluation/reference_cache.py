"""Reference statistics: the features of a whole FashionMNIST split, computed once per extractor and data, cached.

A cache file is named by the extractor's cache key, the split and a hash of the images, so a changed classifier,
Inception weights file or data set never reads stale features; a damaged file is recomputed, never trusted.
"""

import hashlib
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ddpm_fashion.data import load_fashion_mnist
from ddpm_fashion.evaluation.classifier import SHIPPED_WEIGHTS
from ddpm_fashion.evaluation.features import DEFAULT_BATCH_SIZE, extract_features
from ddpm_fashion.guards.files import atomic_output, is_within

CACHE_ENV = "DDPM_FASHION_CACHE"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "ddpm_fashion"

def cache_dir() -> Path:
    """Get the folder for cached reference features: $DDPM_FASHION_CACHE, else ~/.cache/ddpm_fashion."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def reference_features(extractor: nn.Module, split: str = "test", data_dir: Optional[str] = None,
                       batch_size: int = DEFAULT_BATCH_SIZE, device="cpu", cache=None) -> torch.Tensor:
    """Get the features [N, D] of a whole FashionMNIST split, from the cache when this extractor saw this data."""
    images, _ = load_fashion_mnist(split, data_dir)
    data_hash = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]
    folder = Path(cache) if cache is not None else cache_dir()
    path = folder / f"reference-{extractor.cache_key}-{split}-{data_hash}.safetensors"
    if path.is_file():
        try:
            return load_file(path)["features"]
        except (SafetensorError, OSError, KeyError) as error:  # a damaged cache entry is recomputed, not trusted
            print(f"warning: ignoring unreadable cache file {path} ({type(error).__name__})", file=sys.stderr)
    features = extract_features(extractor, images.unsqueeze(1), batch_size, device)
    if is_within(folder, SHIPPED_WEIGHTS):  # the package's own files are never written to
        print(f"warning: not caching reference features in {folder}: it is inside the shipped weights "
              f"({SHIPPED_WEIGHTS}); set {CACHE_ENV} to another folder", file=sys.stderr)
        return features
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Written beside its final name and renamed into place, so a concurrent run never reads half a file.
        with atomic_output(path) as staging:
            save_file({"features": features.contiguous()}, staging,
                      metadata={"extractor": extractor.description, "split": split, "data_sha256": data_hash})
    except OSError as error:  # the cache only saves time; an unwritable one must not stop an evaluation
        print(f"warning: could not cache reference features in {folder} ({error})", file=sys.stderr)
    return features
