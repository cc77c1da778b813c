"""Datasets other than FashionMNIST: an image folder or a `datasets` dataset, prepared as diffusers'
examples/unconditional_image_generation/train_unconditional.py prepares them, fed reproducibly.

Where the images come from (diffusers' options):
    --train_data_dir DIR     `datasets.load_dataset("imagefolder", data_dir=DIR, split="train")`: its "image" column.
    --dataset_name NAME      a folder written with `save_to_disk` (its "train" split when it is a DatasetDict), or
                             `datasets.load_dataset(NAME, --dataset_config_name, split="train")` (a Hub name needs
                             the network, or the `datasets` cache under --cache_dir); its "image" or "img" column.

Each image becomes what torchvision's Resize(resolution, BILINEAR), CenterCrop/RandomCrop(resolution),
RandomHorizontalFlip, ToTensor, Normalize([0.5], [0.5]) make of it (bit for bit, given the same crop and flip), in
the mode of the dataset's first image: grey ("L", 1 channel) when that one is grey, else "RGB"; every other image is
converted to that mode (an RGB image in a grey dataset becomes grey). Unlike torchvision, the random crop offsets
and flips come from the run's seed and the batch's place in the run, never from a global RNG, so resuming and
changing the number of processes give the same batches.

Two ways to feed them, with identical batches: a dataset whose resized images fit in a quarter of the free memory
(IN_MEMORY_VARIABLE overrides the limit) is decoded once into one uint8 tensor, like FashionMNIST; a larger one is
read image by image by a torch DataLoader (`--dataloader_num_workers` worker processes) in the order
ShardedBatchSampler gives.
"""

import copy
import os
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from ddpm_fashion.data import (
    BACKGROUND,
    MODEL_SIZE,
    PADDING,
    ShardBatch,
    ShardedBatchSampler,
    _hub_is_offline,
    load_fashion_mnist,
)
from ddpm_fashion.models.unet import check_unet_kwargs

IMAGE_COLUMNS = ("image", "img")  # diffusers reads "image"; CIFAR-10 on the Hub calls it "img"
# Modes whose pixels are one grey value; every other mode (RGB, RGBA, P, CMYK, ...) trains as RGB.
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
# Bytes of resized uint8 images that may be held in memory; unset: IN_MEMORY_FRACTION of the free memory.
IN_MEMORY_VARIABLE = "DDPM_FASHION_IN_MEMORY_BYTES"
IN_MEMORY_FRACTION = 0.25
# An in-memory dataset larger than this stays in host memory on a GPU run (batches are copied), leaving the GPU's
# memory to the model.
DEVICE_COPY_MAX_BYTES = 1 << 30


class UnreadableImageError(ValueError):
    """An image that PIL cannot decode, named by its file or row."""


# ----------------------------------------------------------------------------------------------------------------
# Choosing and opening the dataset (only reads; every error is a one-line ValueError)
# ----------------------------------------------------------------------------------------------------------------

def uses_other_data(config) -> bool:
    """Say whether the config trains on an image folder or a `datasets` dataset instead of FashionMNIST."""
    return config.train_data_dir is not None or config.dataset_name is not None


def check_data_options(config) -> None:
    """Refuse data options that contradict each other (diffusers silently ignores some; we say which to drop)."""
    chosen = [f"--{name}" for name in ("train_data_dir", "dataset_name", "data_dir") if getattr(config, name)]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} each choose the training data; pass one of them (--data_dir is "
                         "FashionMNIST's folder)")
    if config.dataset_config_name is not None and config.dataset_name is None:
        raise ValueError("--dataset_config_name chooses a configuration of a --dataset_name dataset; pass "
                         "--dataset_name too, or drop it")
    if config.dataloader_num_workers < 0:
        raise ValueError(f"dataloader_num_workers must be 0 (read in the training process) or more, got "
                         f"{config.dataloader_num_workers}")
    if config.resolution is not None and config.resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {config.resolution}")
    if not uses_other_data(config):
        if config.resolution not in (None, MODEL_SIZE):
            raise ValueError(f"resolution {config.resolution} does not fit FashionMNIST, which trains 28x28 padded to "
                             f"{MODEL_SIZE}x{MODEL_SIZE}; drop --resolution, or train on an image folder "
                             "(--train_data_dir)")
        if config.center_crop:
            raise ValueError("--center_crop applies to --train_data_dir and --dataset_name; FashionMNIST is padded, "
                             "never cropped")
        if config.dataloader_num_workers:
            raise ValueError("--dataloader_num_workers applies to --train_data_dir and --dataset_name; FashionMNIST "
                             "is one tensor in memory, so a batch is one indexing op, with nothing for workers to do")


def _is_saved_dataset(path: Path) -> bool:
    """Say whether a folder was written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _quietly(load, *args, **kwargs):
    """Call a `datasets` loader without its progress bars, which would stand between the user and an error line."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return load(*args, **kwargs)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _load_image_folder(folder: str, cache_dir: Optional[str]):
    """Get the "train" split of an imagefolder dataset, or a one-line ValueError saying what the folder lacks."""
    import datasets

    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"--train_data_dir {folder} is not a directory")
    if not any(path.iterdir()):
        raise ValueError(f"--train_data_dir {folder} is empty; put the training images in it (PNG, JPEG, ...)")
    try:
        return _quietly(datasets.load_dataset, "imagefolder", data_dir=str(path), cache_dir=cache_dir, split="train")
    except Exception as error:  # EmptyDatasetError, "corresponds to no data": no file datasets reads as an image
        raise ValueError(f"--train_data_dir {folder} holds no images that datasets' imagefolder reads (PNG, JPEG, "
                         f"...; {type(error).__name__}: {' '.join(str(error).split())[:200]})") from None


def _load_named_dataset(name: str, config_name: Optional[str], cache_dir: Optional[str]):
    """Get the "train" split of a save_to_disk folder or of `load_dataset(name)`; a one-line ValueError if neither."""
    import datasets

    path = Path(name)
    if path.is_dir() and _is_saved_dataset(path):
        if config_name is not None:
            raise ValueError(f"--dataset_config_name {config_name}: {name} is a save_to_disk folder, which has no "
                             "configurations; drop it")
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if "train" not in saved:
                raise ValueError(f"--dataset_name {name}: the saved DatasetDict has splits {sorted(saved)}, no 'train'")
            return saved["train"]
        return saved
    try:
        return _quietly(datasets.load_dataset, name, config_name, cache_dir=cache_dir, split="train")
    except Exception as error:  # offline, no such dataset, no train split: datasets raises many kinds
        offline = " (the Hub is offline here: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if _hub_is_offline() else ""
        raise ValueError(f"--dataset_name {name}: not found{offline}; a Hub dataset needs the network (or the "
                         "datasets cache in --cache_dir), a local one a folder written with save_to_disk "
                         f"({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None


def _image_column(dataset, source: str) -> str:
    """Get the name of the dataset's image column ("image" or "img"), or a one-line ValueError."""
    import datasets

    for name in IMAGE_COLUMNS:
        if name in dataset.column_names:
            if not isinstance(dataset.features[name], datasets.Image):
                raise ValueError(f"{source}: column '{name}' is {dataset.features[name]}, not datasets.Image")
            return name
    raise ValueError(f"{source}: no image column; expected 'image' or 'img', found {dataset.column_names}")


def training_mode(first_mode: str) -> str:
    """Get the mode every image of a dataset trains in, from its first image's: "L" for grey, else "RGB"."""
    return "L" if first_mode in GREY_MODES else "RGB"


def decode_image(item: dict, mode: Optional[str], where: str) -> Image.Image:
    """Decode one image cell ({"bytes", "path"}, as `datasets.Image(decode=False)` stores it) into `mode` (None:
    as stored)."""
    import io

    try:
        source = io.BytesIO(item["bytes"]) if item.get("bytes") is not None else item["path"]
        with Image.open(source) as image:
            image.load()
            return image.convert(mode) if mode is not None else image.copy()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        name = item.get("path") or where
        raise UnreadableImageError(f"cannot read image {name} ({type(error).__name__}: "
                                   f"{' '.join(str(error).split())[:160]}); remove or replace it") from None


def resize_and_center(image: Image.Image, resolution: int, center_crop: bool) -> torch.Tensor:
    """Get uint8 [C, H, W]: torchvision's Resize(resolution, BILINEAR) on the PIL image (its shorter side becomes
    `resolution`), then CenterCrop(resolution) when asked. A random crop is left to `crop`, per batch."""
    image = TF.resize(image, resolution, interpolation=TF.InterpolationMode.BILINEAR)
    if center_crop:
        image = TF.center_crop(image, resolution)
    return TF.pil_to_tensor(image)


def crop(image: torch.Tensor, draw: torch.Tensor, resolution: int) -> torch.Tensor:
    """Crop [C, H, W] to [C, resolution, resolution] at the offset two uniform [0, 1) numbers choose (as
    RandomCrop's randint(0, H - resolution + 1) does with its own RNG)."""
    height, width = image.shape[-2:]
    top = int(draw[0] * (height - resolution + 1))
    left = int(draw[1] * (width - resolution + 1))
    return image[:, top:top + resolution, left:left + resolution]


def crop_draws(seed: int, epoch: int, position: int, global_size: int) -> torch.Tensor:
    """Get the crop offsets' uniform numbers [global_size, 2] of one global batch, from the batch's place in the
    run: the same on every process, for any process count, and again after a resume."""
    key = np.random.SeedSequence([seed, epoch, position]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))
    return torch.rand((global_size, 2), generator=generator)


def round_up(value: int, multiple: int) -> int:
    """Get the smallest multiple of `multiple` that is at least `value`."""
    return -(-value // multiple) * multiple


class PreparedImages(torch.utils.data.Dataset):
    """A map-style dataset of resized (and center-cropped) uint8 images [C, H, W]; an item given as
    (index, draw_y, draw_x) is also randomly cropped to [C, R, R]. Picklable, for DataLoader workers."""

    def __init__(self, dataset, column: str, mode: str, resolution: int, center_crop: bool, source: str):
        self.dataset, self.column, self.mode, self.source = dataset, column, mode, source
        self.resolution, self.center_crop = resolution, center_crop

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Union[int, Tuple[int, float, float]]) -> torch.Tensor:
        index, draw = (item, None) if isinstance(item, int) else (item[0], torch.tensor(item[1:]))
        image = decode_image(self.dataset[index][self.column], self.mode, f"row {index} of {self.source}")
        pixels = resize_and_center(image, self.resolution, self.center_crop)
        return pixels if draw is None else crop(pixels, draw, self.resolution)


# ----------------------------------------------------------------------------------------------------------------
# The data a run trains on: shape first (cheap), then batches
# ----------------------------------------------------------------------------------------------------------------

class TrainingData:
    """The images of a run: FashionMNIST, or a PreparedImages dataset held in memory or streamed.

    `open_training_data` only finds the data and its shape; `load` decodes or starts the loader; `batches` yields
    (ShardBatch, uint8 pixels [b, C, R, R] on the device) in the sampler's order, ready for `pixels_to_model_input`.
    """

    def __init__(self, description: str, channels: int, resolution: int, num_images: int,
                 prepared: Optional[PreparedImages] = None):
        self.description, self.channels, self.resolution, self.num_images = (description, channels, resolution,
                                                                            num_images)
        self.prepared = prepared
        self.images: Union[torch.Tensor, List[torch.Tensor], None] = None  # in memory: one tensor, or one per image
        self.loader: Optional[torch.utils.data.DataLoader] = None  # streaming
        self.requests: Optional[_BatchRequests] = None
        self.seed, self.random_crop = 0, False

    @property
    def is_fashion_mnist(self) -> bool:
        """Say whether this is FashionMNIST (the evaluation code's data set)."""
        return self.prepared is None

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Get one model input's shape (C, R, R)."""
        return self.channels, self.resolution, self.resolution

    def load(self, config, device: torch.device, num_processes: int = 1) -> str:
        """Decode the images into memory, or set up the streaming loader; get a few words saying which."""
        self.seed, self.random_crop = config.seed, not config.center_crop
        if self.is_fashion_mnist:
            self.images = self.images.to(device)  # a batch is one indexing op on the device
            return "in memory"
        budget = in_memory_budget() // max(1, num_processes)  # every process of this machine holds its own copy
        estimate = self.estimated_bytes()
        if estimate <= budget:
            self._decode_into_memory(device, config.dataloader_num_workers)
            return f"in memory ({estimate / 2**20:.1f} MiB)"
        self.requests = _BatchRequests(self.seed, self.random_crop)
        workers = config.dataloader_num_workers
        self.loader = torch.utils.data.DataLoader(self.prepared, batch_sampler=self.requests, num_workers=workers,
                                                  collate_fn=_Stack(self.shape), persistent_workers=workers > 0)
        return (f"streamed by {workers} DataLoader worker(s) (about {estimate / 2**20:.1f} MiB resized, over the "
                f"{budget / 2**20:.1f} MiB in-memory limit)")

    def estimated_bytes(self) -> int:
        """Get the bytes the resized uint8 images take in memory, judged from the first image's aspect ratio."""
        height, width = self.prepared[0].shape[-2:]
        return self.num_images * self.channels * height * width

    def _decode_into_memory(self, device: torch.device, num_workers: int) -> None:
        """Decode every image once (in `num_workers` DataLoader workers), checking each before anything is written."""
        loader = torch.utils.data.DataLoader(self.prepared, batch_size=None, num_workers=num_workers)
        # clone(): a worker's tensor arrives in shared memory, one file descriptor each while it lives.
        images = [image.clone() if num_workers else image for image in _reraising_worker_errors(loader)]
        if all(image.shape == images[0].shape for image in images):
            images = torch.stack(images)
            if device.type == "cpu" or images.numel() <= DEVICE_COPY_MAX_BYTES:
                images = images.to(device)
        self.images = images

    def batches(self, sampler: ShardedBatchSampler, device: torch.device) -> Iterator[Tuple[ShardBatch, torch.Tensor]]:
        """Yield the rest of the sampler's epoch as (this process's ShardBatch, uint8 pixels [b, C, R, R])."""
        if self.loader is not None:
            # The loader reads ahead from a copy of the sampler; the sampler itself moves only as batches are used,
            # so a checkpoint records the batches trained on, not those read ahead.
            self.requests.sampler = copy.deepcopy(sampler)
            for batch, pixels in zip(sampler, _reraising_worker_errors(self.loader)):
                yield batch, pixels.to(device, non_blocking=True)
            return
        for batch in sampler:
            yield batch, self.in_memory_batch(batch, sampler, device)

    def in_memory_batch(self, batch: ShardBatch, sampler: ShardedBatchSampler, device: torch.device) -> torch.Tensor:
        """Get a batch of the in-memory images, padded (FashionMNIST) or cropped as the run's randomness says."""
        if self.is_fashion_mnist:
            # Pad 28 -> 32 with the background value: every pixel reaches the model unchanged.
            images = self.images[batch.indices.to(self.images.device)]
            return F.pad(images, (PADDING,) * 4, value=BACKGROUND).unsqueeze(1)
        if isinstance(self.images, torch.Tensor):
            pixels = self.images[batch.indices.to(self.images.device)]
            if pixels.shape[-2:] == (self.resolution, self.resolution):
                return pixels.to(device, non_blocking=True)  # square images: a crop has nothing to choose
            pixels = list(pixels)
        else:
            pixels = [self.images[i] for i in batch.indices.tolist()]
        if not pixels:  # a process's share of a short last batch may be empty
            return torch.empty((0, *self.shape), dtype=torch.uint8, device=device)
        draws = _share(crop_draws(self.seed, sampler.epoch, sampler.position - 1, batch.global_size), batch)
        return torch.stack([crop(image, draw, self.resolution) for image, draw in zip(pixels, draws)]).to(device)


def _share(draws: torch.Tensor, batch: ShardBatch) -> torch.Tensor:
    """Get this process's rows of a global batch's draws."""
    return draws[batch.start:batch.start + len(batch.indices)]


class _Stack:
    """The streaming DataLoader's collate: one uint8 batch, empty when a process's share of a batch is."""

    def __init__(self, shape: Tuple[int, int, int]):
        self.shape = shape

    def __call__(self, items: List[torch.Tensor]) -> torch.Tensor:
        return torch.stack(items) if items else torch.empty((0, *self.shape), dtype=torch.uint8)


class _BatchRequests:
    """The DataLoader's batch sampler: this process's batches as (index, draw_y, draw_x) items, from a copy of the
    run's sampler that `TrainingData.batches` sets before each pass."""

    def __init__(self, seed: int, random_crop: bool):
        self.seed, self.random_crop = seed, random_crop
        self.sampler: Optional[ShardedBatchSampler] = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        sampler = self.sampler
        for batch in sampler:
            indices = batch.indices.tolist()
            if not self.random_crop:  # a center crop is done while resizing; an int item is not cropped again
                yield indices
                continue
            draws = _share(crop_draws(self.seed, sampler.epoch, sampler.position - 1, batch.global_size), batch)
            yield [(index, *draw.tolist()) for index, draw in zip(indices, draws)]


def _reraising_worker_errors(loader):
    """Iterate a DataLoader, turning a worker's UnreadableImageError (which torch wraps in a traceback) back into
    its one line."""
    try:
        yield from loader
    except UnreadableImageError as error:
        lines = [line for line in str(error).splitlines() if line.startswith(f"{UnreadableImageError.__name__}: ")]
        raise UnreadableImageError(lines[-1].split(": ", 1)[1] if lines else str(error)) from None


def in_memory_budget() -> int:
    """Get the bytes of resized images a run may hold in memory: IN_MEMORY_VARIABLE, else a share of free memory."""
    value = os.environ.get(IN_MEMORY_VARIABLE)
    if value is not None:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{IN_MEMORY_VARIABLE}={value!r} must be a whole number of bytes") from None
    import psutil

    return int(psutil.virtual_memory().available * IN_MEMORY_FRACTION)


def open_training_data(config) -> TrainingData:
    """Find the run's data and its shape, reading one image at most; fill config.resolution and the U-Net's
    sample_size/in_channels/out_channels from it, refusing a contradicting value. Nothing is decoded in bulk yet."""
    check_data_options(config)
    levels = len(check_unet_kwargs(config.unet)["block_out_channels"])
    multiple = 2 ** (levels - 1)  # each of the U-Net's levels but the last halves the image
    if not uses_other_data(config):
        images = load_fashion_mnist("train", config.data_dir, config.cache_dir)[0]  # 47 MB, read in under a second
        data = TrainingData("FashionMNIST (28x28 grey, padded to 32x32)", 1, MODEL_SIZE, len(images))
        data.images = images
    else:
        if config.train_data_dir is not None:
            source, dataset = config.train_data_dir, _load_image_folder(config.train_data_dir, config.cache_dir)
        else:
            source = config.dataset_name
            dataset = _load_named_dataset(config.dataset_name, config.dataset_config_name, config.cache_dir)
        import datasets

        column = _image_column(dataset, source)
        dataset = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        if len(dataset) == 0:
            raise ValueError(f"{source}: the dataset has no images")
        mode, size = _first_image(dataset[0][column], f"row 0 of {source}")
        channels = 1 if mode == "L" else 3
        resolution = config.resolution or config.unet.get("sample_size") or round_up(min(size), multiple)
        prepared = PreparedImages(dataset, column, mode, resolution, config.center_crop, source)
        data = TrainingData(f"{source} ({len(dataset)} images, {mode}, resolution {resolution})", channels,
                            resolution, len(dataset), prepared)
    if data.resolution % multiple:
        lower, higher = max(multiple, data.resolution // multiple * multiple), round_up(data.resolution, multiple)
        raise ValueError(f"resolution {data.resolution} is not a multiple of {multiple}, which a U-Net of {levels} "
                         f"levels needs (each level but the last halves the image); use {lower} or {higher}")
    fit_unet_to_data(config, data)
    return data


def _first_image(item: dict, where: str) -> Tuple[str, Tuple[int, int]]:
    """Get the training mode a dataset's first image sets for all, and that image's (width, height)."""
    image = decode_image(item, None, where)
    return training_mode(image.mode), image.size


def fit_unet_to_data(config, data: TrainingData) -> None:
    """Set the U-Net's sample_size, in_channels and out_channels to the data's, refusing a value that differs."""
    wanted = {"sample_size": data.resolution, "in_channels": data.channels, "out_channels": data.channels}
    given = {key: config.unet.get(key) for key in wanted if config.unet.get(key) is not None}
    conflicts = [f"{key} {value} (the data needs {wanted[key]})" for key, value in given.items()
                 if value != wanted[key]]
    if conflicts:
        raise ValueError(f"unet {', '.join(conflicts)} does not fit {data.description}; drop those --unet "
                         "overrides (they follow the data)")
    config.unet.update(wanted)
    config.resolution = data.resolution
    for name in ("train_data_dir", "dataset_name"):  # a folder is recorded absolute: resume compares it
        value = getattr(config, name)
        if value is not None and Path(value).exists():
            setattr(config, name, str(Path(value).resolve()))
