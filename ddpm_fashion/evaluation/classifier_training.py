"""Training the FashionMNIST classifier (evaluation/classifier.py) and saving it with a record of the run."""

import json
import os
import platform
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification, PreTrainedModel, get_cosine_schedule_with_warmup

from ddpm_fashion.data import IMAGE_SIZE, load_fashion_mnist
from ddpm_fashion.evaluation.classifier import METADATA_FILE, accuracy, classifier_config, describe, to_pixel_values
from ddpm_fashion.guards.files import staged_dir
from ddpm_fashion.guards.inputs import MAX_SEED, check_int

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


def check_trainable(num_train_images: int) -> None:
    """Raise a one-line ValueError when a training split is smaller than one batch: no optimizer step would run."""
    # The last partial batch of an epoch is dropped, because BatchNorm's statistics of a tiny batch are noise.
    if num_train_images < BATCH_SIZE:
        raise ValueError(f"the training split has {num_train_images} images, fewer than one batch of {BATCH_SIZE}: "
                         f"training would take no optimizer step; give the full FashionMNIST training split")


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


def train_classifier(epochs: int = DEFAULT_EPOCHS, data_dir: Optional[str] = None, seed: int = 0,
                     progress: bool = True) -> Tuple[PreTrainedModel, dict]:
    """Train the classifier on the FashionMNIST train split; get it (eval mode) and a record of the run."""
    check_int("epochs", epochs)
    check_int("seed", seed, 0, MAX_SEED)
    train_images, train_labels = load_fashion_mnist("train", data_dir)
    test_images, test_labels = load_fashion_mnist("test", data_dir)
    check_trainable(len(train_images))
    started, started_cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    model = AutoModelForImageClassification.from_config(classifier_config()).train()
    model.to(memory_format=torch.channels_last)  # about a quarter faster convolutions on CPU
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    batches_per_epoch = len(train_images) // BATCH_SIZE  # the last partial batch is dropped (see check_trainable)
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


def save_classifier(model: PreTrainedModel, record: dict, out) -> Path:
    """Save the classifier (config.json, model.safetensors) and its training record as a new folder `out`.

    The files are written into a temporary folder beside `out`, renamed to `out` only when complete.
    """
    folder = Path(out)
    with staged_dir(folder) as staging:
        model.save_pretrained(staging)
        (staging / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return folder
