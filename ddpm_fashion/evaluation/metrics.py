"""Sample-quality metrics on feature sets: FID, k-NN precision and recall, and the class histogram's balance.

- FID: torchmetrics' FrechetInceptionDistance over precomputed features.
- Precision and recall: Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
  Models" (k = 3), computed in ddpm_fashion/evaluation/precision_recall.py (own k-NN code, so no library release
  can swap the arguments' meaning).
- Class balance: KL divergence of the classifier's class histogram from uniform, in nats.
- Background: the share of black and near-black pixels (FashionMNIST's background is exactly black).
"""

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ddpm_fashion.data import CLASS_NAMES

NEIGHBOURS = 3  # the k of k-NN precision and recall, as recommended by Kynkaanniemi et al. 2019


class PrecomputedFeatures(nn.Module):
    """Identity feature 'extractor', so FrechetInceptionDistance takes features that were extracted (and cached)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the features unchanged."""
        return features


def frechet_distance(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Get the Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D] (torchmetrics' FID)."""
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(generated.shape[1]))
    metric.update(reference, real=True)
    metric.update(generated, real=False)
    return metric.compute().item()


def class_histogram(predictions: torch.Tensor) -> torch.Tensor:
    """Get the fraction [10] of predictions that falls in each class."""
    return torch.bincount(predictions, minlength=len(CLASS_NAMES)).double() / len(predictions)


def kl_from_uniform(histogram: torch.Tensor) -> float:
    """Get KL(histogram || uniform) in nats: 0 for perfectly balanced classes, log(10) for a single class."""
    uniform = 1.0 / len(histogram)
    # xlogy makes empty classes contribute 0, the limit of p log p.
    return torch.special.xlogy(histogram, histogram / uniform).sum().item()


NEAR_BLACK = range(1, 8)  # "near black": 1/255 .. 7/255


def pixel_shares(images: torch.Tensor) -> dict:
    """Get the share of uint8 pixels that are exactly 0, and that are near black (1-7 of 255)."""
    return {"black_share": float((images == 0).float().mean()),
            "near_black_share": float(((images >= NEAR_BLACK.start) & (images < NEAR_BLACK.stop)).float().mean())}
