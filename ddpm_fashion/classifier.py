"""The FashionMNIST classifier behind `fmnist` features: its model, its training, and `ddpm-fashion train-classifier`.

It is a small transformers `PreTrainedModel` (a RegNetY) (one grey channel, ten labels named by CLASS_NAMES), so
it saves and loads with save_pretrained / from_pretrained as safetensors. Its pooled penultimate activations are the
features that FID and precision/recall compare (ddpm_fashion/evaluate.py); its predictions give the class histogram
of generated images. The trained weights ship in ddpm_fashion/weights/fmnist_classifier, with `training.json`
recording how they were made and the test accuracy they reach.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification, PreTrainedModel, RegNetConfig, get_cosine_schedule_with_warmup
from transformers.utils import logging as transformers_logging

from ddpm_fashion.cli import check_output_path, positive_int
from ddpm_fashion.data import CLASS_NAMES, IMAGE_SIZE, load_fashion_mnist

WEIGHTS_DIR = Path(__file__).parent / "weights" / "fmnist_classifier"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "training.json"
REQUIRED_ACCURACY = 0.93

# A RegNetY (grouped 3x3 convolutions with squeeze-and-excitation) rather than a ResNet: RegNet's stem is one 3x3
# stride-2 convolution (28x28 -> 14x14) and its first stage keeps that size, where ResNet's 7x7 stem and max-pool
# shrink a 28x28 garment to 7x7 before any residual block. Same cost per batch on two CPU cores (measured: 41 ms for
# a RegNetX vs 40 ms for a [32, 64, 128] ResNet, forward + backward of 128 images); that ResNet stalled at 92.1%.
HIDDEN_SIZES = (48, 96, 192)
DEPTHS = (1, 2, 1)
EMBEDDING_SIZE = 32
GROUPS_WIDTH = 16

DEFAULT_EPOCHS = 20
BATCH_SIZE = 128
# SGD with Nesterov momentum: for this net it reached higher test accuracy in a dozen epochs than AdamW did.
LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
WARMUP_FRACTION = 0.05
# Mirroring and shifts of one pixel: garments are left/right symmetric and centred only roughly. Two-pixel shifts
# made the short training underfit.
MAX_SHIFT = 1
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
                                f"make one with `ddpm-fashion train-classifier --out {folder}`")
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


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror half of a uint8 batch [B, 28, 28] and shift each image by up to MAX_SHIFT pixels, filling with black."""
    batch = len(images)
    mirror = torch.rand(batch, generator=generator) < 0.5
    images = torch.where(mirror[:, None, None], images.flip(-1), images)
    padded = F.pad(images, (MAX_SHIFT,) * 4)  # [B, 28 + 2 * MAX_SHIFT, 28 + 2 * MAX_SHIFT]
    rows, cols = (torch.randint(0, 2 * MAX_SHIFT + 1, (batch,), generator=generator) for _ in range(2))
    window = torch.arange(IMAGE_SIZE)
    # One gather crops every image at its own offset: [B, 1, 1], [B, 28, 1], [B, 1, 28] broadcast to [B, 28, 28].
    return padded[torch.arange(batch)[:, None, None], (rows[:, None] + window)[:, :, None],
                  (cols[:, None] + window)[:, None, :]]


def describe(model: PreTrainedModel) -> str:
    """Get a one-line description of a classifier's architecture."""
    config = model.config
    return (f"{type(model).__name__} ({config.layer_type} layers, embedding {config.embedding_size}, hidden sizes "
            f"{list(config.hidden_sizes)}, depths {list(config.depths)}), "
            f"{sum(parameter.numel() for parameter in model.parameters())} parameters")


def train_classifier(epochs: int = DEFAULT_EPOCHS, data_dir: Optional[str] = None, seed: int = 0,
                     progress: bool = True) -> Tuple[PreTrainedModel, dict]:
    """Train the classifier on the FashionMNIST train split; get it (eval mode) and a record of the run."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    train_images, train_labels = load_fashion_mnist("train", data_dir)
    test_images, test_labels = load_fashion_mnist("test", data_dir)
    started, started_cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    model = AutoModelForImageClassification.from_config(classifier_config()).train()
    model.to(memory_format=torch.channels_last)  # about a quarter faster convolutions on CPU
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    batches_per_epoch = len(train_images) // BATCH_SIZE  # the last partial batch is dropped: BatchNorm dislikes tiny ones
    total_steps = epochs * batches_per_epoch
    schedule = get_cosine_schedule_with_warmup(optimizer, round(WARMUP_FRACTION * total_steps), total_steps)
    generator = torch.Generator().manual_seed(seed)
    with tqdm(total=total_steps, desc="training classifier", unit="batch", disable=not progress) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(train_images), generator=generator)
            for batch in order[:batches_per_epoch * BATCH_SIZE].split(BATCH_SIZE):
                images = augment(train_images[batch], generator)
                loss = model(pixel_values=to_pixel_values(images), labels=train_labels[batch]).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    model.to(memory_format=torch.contiguous_format).eval()  # safetensors stores contiguous tensors
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
    record = {
        "architecture": describe(model),
        "input": "grey 28x28 images in [0, 1], scaled to [-1, 1]",
        "test_accuracy": accuracy(model, test_images, test_labels),
        "train_seconds": round(train_seconds, 1),
        # Wall time depends on what else shares the cores; CPU time (all threads) does not.
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "optimizer": f"SGD, Nesterov momentum {MOMENTUM}, learning rate {LEARNING_RATE} with {WARMUP_FRACTION:.0%} "
                     f"warm-up and cosine decay, weight decay {WEIGHT_DECAY}",
        "augmentation": f"random horizontal flip, random shift of up to {MAX_SHIFT} pixels",
        "seed": seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
    }
    return model, record


def check_output_dir(out) -> Path:
    """Create the classifier output folder if needed, or raise a one-line error unless it can be written."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if not folder.parent.is_dir():
        raise ValueError(f"--out {out} cannot be created: directory {folder.parent} does not exist")
    folder.mkdir(exist_ok=True)
    check_output_path(str(folder / METADATA_FILE), (".json",))
    return folder


def save_classifier(model: PreTrainedModel, record: dict, out) -> Path:
    """Save the classifier (config.json, model.safetensors) and its training record; each file lands whole."""
    folder = check_output_dir(out)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".saving-"))
    try:
        model.save_pretrained(staging)
        (staging / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for name in ("config.json", WEIGHTS_FILE, METADATA_FILE):
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def run_train_classifier(args: argparse.Namespace) -> int:
    """Train the FashionMNIST classifier and save it with its training record."""
    check_output_dir(args.out)  # before minutes of training, not after
    model, record = train_classifier(args.epochs, args.data_dir, args.seed, progress=not args.quiet)
    data_option = f" --data_dir {args.data_dir}" if args.data_dir else ""
    record["command"] = (f"ddpm-fashion train-classifier --out {args.out} --epochs {args.epochs} "
                         f"--seed {args.seed}{data_option}")
    folder = save_classifier(model, record, args.out)
    print(f"test accuracy {record['test_accuracy']:.4f} after {record['epochs']} epochs "
          f"({record['train_seconds']:.0f} s); saved to {folder}")
    if record["test_accuracy"] < REQUIRED_ACCURACY:
        print(f"warning: test accuracy is below the {REQUIRED_ACCURACY:.0%} that fmnist features are meant to have",
              file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `train-classifier` subcommand to the CLI."""
    parser = subparsers.add_parser("train-classifier",
                                   help="train the FashionMNIST classifier behind fmnist FID features")
    parser.add_argument("--out", default=str(WEIGHTS_DIR),
                        help="folder for config.json, model.safetensors and training.json (default: the shipped "
                             "weights inside the package)")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS)
    parser.add_argument("--data_dir", default=None, help="folder with the FashionMNIST IDX .gz files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train_classifier)
    return parser
