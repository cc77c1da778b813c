"""The FashionMNIST classifier behind `fmnist` features: its architecture, its input, loading and prediction.

It is a small transformers `PreTrainedModel` (a RegNetY; one grey channel, ten labels named by CLASS_NAMES), so it
saves and loads with save_pretrained / from_pretrained as safetensors. Its pooled penultimate activations are the
features that FID and precision/recall compare (ddpm_fashion/evaluation/features.py); its predictions give the class
histogram of generated images. The trained weights ship in ddpm_fashion/weights/fmnist_classifier, with `training.json`
recording how they were made (ddpm_fashion/evaluation/classifier_training.py) and the test accuracy they reach.
"""

from pathlib import Path
from typing import Tuple

import torch
from transformers import AutoModelForImageClassification, PreTrainedModel, RegNetConfig
from transformers.utils import logging as transformers_logging

from ddpm_fashion.data import CLASS_NAMES, IMAGE_SIZE

# Everything under this folder ships with the package: no command may write into it.
SHIPPED_WEIGHTS = Path(__file__).parent.parent / "weights"
WEIGHTS_DIR = SHIPPED_WEIGHTS / "fmnist_classifier"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "training.json"
REQUIRED_ACCURACY = 0.93

# A RegNetY (grouped 3x3 convolutions with squeeze-and-excitation) rather than a ResNet: RegNet's stem is one 3x3
# stride-2 convolution (28x28 -> 14x14) and its first stage keeps that size, where ResNet's 7x7 stem and max-pool
# shrink a 28x28 garment to 7x7 before any residual block. It costs about what a small ResNet costs per batch and
# reaches the accuracy that ResNet did not (measured: ddpm_fashion/weights/fmnist_classifier/training.json).
HIDDEN_SIZES = (48, 96, 192)
DEPTHS = (1, 2, 1)
EMBEDDING_SIZE = 32
GROUPS_WIDTH = 16
EVAL_BATCH_SIZE = 1000


def classifier_config() -> RegNetConfig:
    """Get the configuration of the FashionMNIST classifier: a small one-channel RegNetY with ten named labels."""
    return RegNetConfig(
        num_channels=1,
        embedding_size=EMBEDDING_SIZE,
        hidden_sizes=list(HIDDEN_SIZES),
        depths=list(DEPTHS),
        groups_width=GROUPS_WIDTH,
        layer_type="y",
        downsample_in_first_stage=False,
        num_labels=len(CLASS_NAMES),
        id2label=dict(enumerate(CLASS_NAMES)),
        label2id={name: index for index, name in enumerate(CLASS_NAMES)},
    )


def to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """Turn uint8 [N, (1,) 28, 28] or float [N, 1, 28, 28] images in [0, 1] into classifier input in [-1, 1]."""
    if images.dim() == 3:
        images = images.unsqueeze(1)  # [N, 28, 28] -> [N, 1, 28, 28]
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"classifier input must be [N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}] grey images, got "
                         f"{list(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255
    elif not images.is_floating_point():
        raise ValueError(f"classifier input must be uint8 in [0, 255] or float in [0, 1], got {images.dtype}")
    # The diffusion model's own scaling, so the classifier needs no data-set statistics.
    return images * 2 - 1


def load_classifier(path=WEIGHTS_DIR) -> PreTrainedModel:
    """Load a trained classifier from a local folder (the shipped weights by default), in eval mode."""
    folder = Path(path)
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no trained classifier in {folder}: it needs config.json and {WEIGHTS_FILE}; "
                                f"make one with `ddpm-fashion train-classifier --out FOLDER` and pass that folder")
    # transformers draws a progress bar over the tensors of even this 0.8 MB model: noise in a command's output.
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    finally:
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()
    return model.eval()


@torch.no_grad()
def features_and_logits(model: PreTrainedModel, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Get the pooled penultimate features [N, D] and the class logits [N, 10] of images, in one forward pass."""
    pixel_values = to_pixel_values(images).to(model.device)
    pooled = model.base_model(pixel_values).pooler_output  # [N, D, 1, 1]
    logits = model.classifier(pooled)
    return pooled.flatten(1), logits  # [N, D], [N, 10]


@torch.no_grad()
def predict(model: PreTrainedModel, images: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Get the predicted class index [N] of each image, batch by batch."""
    predictions = [model(pixel_values=to_pixel_values(batch).to(model.device)).logits.argmax(-1).cpu()
                   for batch in images.split(batch_size)]
    return torch.cat(predictions)


def accuracy(model: PreTrainedModel, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Get the fraction of images whose predicted class is their label."""
    was_training = model.training
    model.eval()
    correct = (predict(model, images) == labels).float().mean().item()
    model.train(was_training)
    return correct


def describe(model: PreTrainedModel) -> str:
    """Get a one-line description of a classifier's architecture."""
    config = model.config
    return (f"{type(model).__name__} ({config.layer_type} layers, embedding {config.embedding_size}, hidden sizes "
            f"{list(config.hidden_sizes)}, depths {list(config.depths)}), "
            f"{sum(parameter.numel() for parameter in model.parameters())} parameters")
