"""Sample quality, offline: FID, precision/recall and the class histogram of images against FashionMNIST.

Protocol (every number in a report says how it was made):
    - Images: generated 32x32 images are cropped back to FashionMNIST's 28x28 (the padding is ours, not the data's)
      and quantised to uint8 like a saved PNG, so generated and real images take the same path into the features
      (ddpm_fashion/sampling/pictures.py).
    - Features: `fmnist` (the shipped classifier's) or `inception` (standard FID InceptionV3), see
      ddpm_fashion/evaluation/features.py.
    - FID: against the whole reference split (the FashionMNIST test set by default), whose features are computed
      once and cached (ddpm_fashion/evaluation/reference_cache.py).
    - Precision and recall (k-NN, Kynkaanniemi et al. 2019) with as many reference images as samples, and the class
      histogram with its KL divergence from uniform (ddpm_fashion/evaluation/metrics.py).
"""

import os
import platform
from typing import Optional

import torch

from ddpm_fashion.data import CLASS_NAMES, IMAGE_SIZE, MODEL_SIZE, load_fashion_mnist
from ddpm_fashion.evaluation.classifier import features_and_logits
from ddpm_fashion.evaluation.features import (
    DEFAULT_BATCH_SIZE,
    INCEPTION_ANTIALIAS,
    ClassifierFeatures,
    build_feature_extractor,
)
from ddpm_fashion.evaluation.metrics import NEIGHBOURS, class_histogram, frechet_distance, kl_from_uniform
from ddpm_fashion.evaluation.precision_recall import precision_recall
from ddpm_fashion.evaluation.reference_cache import reference_features
from ddpm_fashion.guards.inputs import MAX_SEED, check_int
from ddpm_fashion.sampling.pictures import to_uint8_images

REAL_TRAIN = "real-train"
# k-NN radii need k + 1 points per set, and FID a covariance; below this many images neither means anything.
MIN_SAMPLES = 10
DEFAULT_NUM_SAMPLES = 10000
# A fixed seed for choosing the reference images of precision/recall, so every run of a table meets the same ones.
REFERENCE_SUBSET_SEED = 0


class Evaluator:
    """Scores image sets against one reference split: holds the feature extractor, classifier and reference features."""

    def __init__(self, features: str = "fmnist", reference_split: str = "test", data_dir: Optional[str] = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, inception_weights: Optional[str] = None, device="cpu",
                 cache=None):
        check_int("batch_size", batch_size)
        self.features, self.reference_split = features, reference_split
        self.batch_size, self.device = batch_size, device
        self.extractor = build_feature_extractor(features, inception_weights)
        self.classifier = self.extractor if isinstance(self.extractor, ClassifierFeatures) else ClassifierFeatures()
        self.reference = reference_features(self.extractor, reference_split, data_dir, batch_size, device, cache)

    @torch.no_grad()
    def _features_and_predictions(self, images: torch.Tensor):
        """Get the features [N, D] and the classifier's predicted classes [N] of uint8 images [N, 1, 28, 28]."""
        self.extractor.to(self.device).eval()
        self.classifier.to(self.device).eval()
        features, predictions = [], []
        for batch in images.split(self.batch_size):
            batch = batch.to(self.device)
            # With fmnist features the classifier is the extractor: one forward pass gives both.
            batch_features, logits = features_and_logits(self.classifier.model, batch)
            if self.extractor is not self.classifier:
                batch_features = self.extractor(batch)
            features.append(batch_features.float().cpu())
            predictions.append(logits.argmax(-1).cpu())
        return torch.cat(features), torch.cat(predictions)

    def evaluate(self, images: torch.Tensor) -> dict:
        """Get FID, precision/recall, the class histogram and the protocol for images [N, 1, 28|32, 28|32]."""
        images = to_uint8_images(images)
        if len(images) < MIN_SAMPLES:
            raise ValueError(f"need at least {MIN_SAMPLES} images to evaluate, got {len(images)}")
        generated, predictions = self._features_and_predictions(images)
        # As many reference images as samples for precision/recall: k-NN radii shrink as a set grows.
        subset_size = min(len(generated), len(self.reference))
        chosen = torch.randperm(len(self.reference), generator=torch.Generator().manual_seed(REFERENCE_SUBSET_SEED))
        scores = precision_recall(generated[:subset_size], self.reference[chosen[:subset_size]], k=NEIGHBOURS)
        histogram = class_histogram(predictions)
        report = {
            "fid": frechet_distance(generated, self.reference),
            **scores,
            "class_histogram": dict(zip(CLASS_NAMES, histogram.tolist())),
            "class_kl_from_uniform": kl_from_uniform(histogram),
            "features": self.features,
            "feature_extractor": self.extractor.description,
            "num_samples": len(images),
            "reference": self.reference_split,
            "reference_images": len(self.reference),
            "precision_recall_protocol": f"Kynkaanniemi et al. 2019, k={NEIGHBOURS}, {subset_size} samples vs "
                                         f"{subset_size} reference images (seed {REFERENCE_SUBSET_SEED})",
            "image_size": IMAGE_SIZE,
            "crop": f"{MODEL_SIZE}x{MODEL_SIZE} images cropped to the central {IMAGE_SIZE}x{IMAGE_SIZE}; "
                    f"floats quantised to uint8",
        }
        if self.features == "inception":
            report["inception_antialias"] = INCEPTION_ANTIALIAS
        return report


def real_training_images(num_samples: int, seed: int = 0, data_dir: Optional[str] = None) -> torch.Tensor:
    """Get num_samples training images chosen at random (seeded), uint8 [N, 1, 28, 28]: the real-data floor."""
    check_int("num_samples", num_samples)
    check_int("seed", seed, 0, MAX_SEED)
    images, _ = load_fashion_mnist("train", data_dir)
    if num_samples > len(images):
        raise ValueError(f"--num_samples {num_samples} is more than the {len(images)} training images")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return images[chosen].unsqueeze(1)


def machine_description(device: torch.device) -> str:
    """Get a short description of the machine a timing was taken on."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = cpu_model_name()
    return (f"{model + ' (' if model else ''}{platform.machine()} CPU{')' if model else ''}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


def cpu_model_name() -> str:
    """Get the CPU's model name from /proc/cpuinfo (empty where there is none): timings depend on it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    except OSError:
        return ""
    return names[0] if names else ""


def format_report(report: dict) -> str:
    """Get the human-readable summary of an evaluation report."""
    histogram = ", ".join(f"{name} {fraction:.3f}" for name, fraction in report["class_histogram"].items())
    source = ("real training images" if report["model"] == REAL_TRAIN
              else f"{report['model']} ({report['sampler']}, {report['num_inference_steps']} steps)")
    lines = [
        f"FID {report['fid']:.3f}   precision {report['precision']:.3f}   recall {report['recall']:.3f}",
        f"class histogram: {histogram}",
        f"KL(class histogram || uniform) = {report['class_kl_from_uniform']:.4f} nats",
        f"protocol: {report['num_samples']} images from {source}, seed {report['seed']}, vs FashionMNIST "
        f"{report['reference']} ({report['reference_images']} images); {report['feature_extractor']}; "
        f"{report['crop']}; precision/recall {report['precision_recall_protocol']}",
    ]
    if report.get("seconds_per_1000_images") is not None:
        lines.append(f"sampling: {report['seconds_per_1000_images']:.1f} s per 1000 images on {report['machine']}")
    return "\n".join(lines)
