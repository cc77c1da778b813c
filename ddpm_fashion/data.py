"""FashionMNIST: finding it, reading it exactly, and feeding it to the model fast.

Where the data comes from, first match wins:
    1. `data_dir`, when given (and then it must hold the data; a wrong folder never falls back silently):
       - the four IDX files, raw or gzipped, named as Zalando ships them (`train-images-idx3-ubyte.gz`, ...),
         directly in the folder or in `FashionMNIST/raw/` below it (torchvision's layout);
       - or a `datasets` dataset written with `save_to_disk`: a DatasetDict with `train`/`test`, or a single
         Dataset, which is used for the requested split unless it records a different split name.
    2. The Debian/Ubuntu package `dataset-fashion-mnist` in /usr/share/datasets/fashion-mnist.
    3. `datasets.load_dataset("zalando-datasets/fashion_mnist")`, unless HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set.

Training never touches PIL: the split is one uint8 tensor (47 MB for train, kept on the training device), a batch
is one indexing op, and `to_model_input` pads, flips and scales the whole batch at once. Batch order comes from
`ShardedBatchSampler`, which splits each global batch across processes and resumes mid-epoch from three numbers.
Other datasets (an image folder, a `datasets` dataset) are ddpm_fashion/image_datasets.py's.
"""

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
HUB_DATASET_ID = "zalando-datasets/fashion_mnist"
SPLITS = ("train", "test")
# The IDX files call the test split "t10k".
IDX_PREFIXES = {"train": "train", "test": "t10k"}
TORCHVISION_SUBDIR = os.path.join("FashionMNIST", "raw")

IMAGE_SIZE = 28
MODEL_SIZE = 32
PADDING = (MODEL_SIZE - IMAGE_SIZE) // 2
# FashionMNIST's background is exact black, so padding with it adds nothing the images do not already have.
BACKGROUND = 0

# An IDX header is two zero bytes, a type code, and the number of dimensions; 0x08 means unsigned bytes.
IDX_UNSIGNED_BYTE = 0x08
IDX_IMAGE_MAGIC = 0x00000803
IDX_LABEL_MAGIC = 0x00000801
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
TRUE_VALUES = ("1", "ON", "YES", "TRUE")

HOW_TO_GET_THE_DATA = (f"get FashionMNIST one of three ways: `apt-get install dataset-fashion-mnist` (puts it in "
                       f"{DEBIAN_DIR}), `--data_dir` pointing to the four IDX files or a `save_to_disk` dataset, or "
                       f"network access to the Hugging Face Hub ({HUB_DATASET_ID}; unset HF_HUB_OFFLINE and "
                       f"HF_DATASETS_OFFLINE)")


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def _read_file_bytes(path: Path) -> bytes:
    """Get the whole content of a file, gunzipped when its name ends in .gz."""
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError; truncation is an EOFError
        raise ValueError(f"{path}: corrupt or truncated gzip ({error})") from None


def read_idx(path, magic: int) -> np.ndarray:
    """Read one unsigned-byte IDX file, checking its magic number and that its length matches its header."""
    path = Path(path)
    data = _read_file_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX header (4 bytes of magic number)")
    (found_magic,) = struct.unpack(">I", data[:4])
    if found_magic != magic:
        raise ValueError(f"{path}: wrong magic number 0x{found_magic:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: {len(data)} bytes is too short for a {ndim}-dimension IDX header "
                         f"({header_size} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    expected_size = header_size + int(np.prod(shape))
    if len(data) != expected_size:
        raise ValueError(f"{path}: {len(data)} bytes, but its header's shape {tuple(shape)} needs exactly "
                         f"{expected_size}")
    # copy(): frombuffer over bytes is read-only, and torch wants tensors it may write.
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def _check_arrays(images: np.ndarray, labels: np.ndarray, source) -> None:
    """Check that images and labels are a whole, consistent FashionMNIST split."""
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{source}: images have shape {tuple(images.shape)}, expected "
                         f"[N, {IMAGE_SIZE}, {IMAGE_SIZE}] grayscale")
    if len(images) != len(labels):
        raise ValueError(f"{source}: {len(images)} images but {len(labels)} labels; the counts must match")
    if len(labels) == 0:
        raise ValueError(f"{source}: the split is empty")
    if labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{source}: labels range over [{labels.min()}, {labels.max()}], "
                         f"expected 0..{len(CLASS_NAMES) - 1}")


def _existing_file(folder: Path, name: str) -> Optional[Path]:
    """Get folder/name, or folder/name.gz, whichever exists first (torchvision keeps both), or None."""
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def _find_idx_pair(folder: Path, split: str) -> Optional[Tuple[Path, Path]]:
    """Get the (images, labels) IDX files of a split in a folder, raw preferred over .gz; None if neither is there."""
    names = [f"{IDX_PREFIXES[split]}-images-idx3-ubyte", f"{IDX_PREFIXES[split]}-labels-idx1-ubyte"]
    found = [_existing_file(folder, name) for name in names]
    if found == [None, None]:
        return None
    for path, name in zip(found, names):
        if path is None:
            raise FileNotFoundError(f"{folder}: has only half of the {split} split, {name}[.gz] is missing")
    return found[0], found[1]


def _read_idx_split(images_path: Path, labels_path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Read and cross-check the images and labels files of one split."""
    images = read_idx(images_path, IDX_IMAGE_MAGIC)
    labels = read_idx(labels_path, IDX_LABEL_MAGIC)
    _check_arrays(images, labels, f"{images_path} + {labels_path.name}")
    return images, labels.astype(np.int64)


def _saved_dataset(folder: Path, split: str):
    """Get the split from a `save_to_disk` folder, or None when the folder is not one."""
    import datasets

    is_dict, is_single = (folder / "dataset_dict.json").is_file(), (folder / "state.json").is_file()
    if not (is_dict or is_single):
        return None
    saved = datasets.load_from_disk(str(folder))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise ValueError(f"{folder}: saved DatasetDict has splits {sorted(saved)}, not '{split}'")
        return saved[split]
    if saved.split is not None and str(saved.split) != split:
        raise ValueError(f"{folder}: saved Dataset is the '{saved.split}' split, not '{split}'")
    return saved


def _dataset_to_arrays(dataset, source) -> Tuple[np.ndarray, np.ndarray]:
    """Decode a `datasets` FashionMNIST split into uint8 [N, 28, 28] images and int64 [N] labels."""
    missing = {"image", "label"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{source}: dataset lacks column(s) {sorted(missing)}; expected 'image' and 'label'")
    columns = dataset.select_columns(["image", "label"]).with_format("numpy")
    images = np.asarray(columns["image"][:])
    labels = np.asarray(columns["label"][:]).astype(np.int64)
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images decode to {images.dtype}, expected uint8 grayscale")
    _check_arrays(images, labels, source)
    return images, labels


def _hub_is_offline() -> bool:
    """Say whether the user switched the Hub off (checked at call time, so tests may flip it)."""
    return any(os.environ.get(name, "").upper() in TRUE_VALUES for name in OFFLINE_VARIABLES)


def _check_split(split: str) -> None:
    """Refuse a split name other than train or test."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class FoundSplit(NamedTuple):
    """Where a split was found: two IDX files, or a `datasets.Dataset` and where it came from."""

    images_path: Optional[Path] = None
    labels_path: Optional[Path] = None
    dataset: object = None
    source: str = ""


def _locate(split: str, data_dir: Optional[str], cache_dir: Optional[str] = None) -> FoundSplit:
    """Find a split: its IDX file pair, or a `datasets.Dataset` (saved to disk, or from the Hub into cache_dir)."""
    _check_split(split)
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"data_dir {folder} is not a directory; {HOW_TO_GET_THE_DATA}")
        for candidate in (folder, folder / TORCHVISION_SUBDIR):
            pair = _find_idx_pair(candidate, split) if candidate.is_dir() else None
            if pair is not None:
                return FoundSplit(*pair)
        saved = _saved_dataset(folder, split)
        if saved is not None:
            return FoundSplit(dataset=saved, source=str(folder))
        raise FileNotFoundError(f"data_dir {folder} holds neither the {split} IDX files nor a save_to_disk "
                                f"dataset; {HOW_TO_GET_THE_DATA}")
    debian = Path(DEBIAN_DIR)
    if debian.is_dir():
        pair = _find_idx_pair(debian, split)
        if pair is not None:
            return FoundSplit(*pair)
    if _hub_is_offline():
        raise FileNotFoundError(f"FashionMNIST not found in {DEBIAN_DIR} and the Hub is offline; "
                                f"{HOW_TO_GET_THE_DATA}")
    import datasets

    try:
        return FoundSplit(dataset=datasets.load_dataset(HUB_DATASET_ID, split=split, cache_dir=cache_dir),
                          source=HUB_DATASET_ID)
    except Exception as error:  # any failure here (no network, no such repo) means the third way failed too
        raise FileNotFoundError(f"FashionMNIST not found in {DEBIAN_DIR} and the Hub failed "
                                f"({type(error).__name__}: {error}); {HOW_TO_GET_THE_DATA}") from error


def load_fashion_mnist(split: str = "train", data_dir: Optional[str] = None,
                       cache_dir: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Get a whole FashionMNIST split as uint8 images [N, 28, 28] and int64 labels [N] (a Hub download goes to
    the `datasets` cache, or cache_dir)."""
    found = _locate(split, data_dir, cache_dir)
    if found.dataset is None:
        images, labels = _read_idx_split(found.images_path, found.labels_path)
    else:
        images, labels = _dataset_to_arrays(found.dataset, found.source)
    return torch.from_numpy(images), torch.from_numpy(labels)


def fashion_mnist_features():
    """Get the `datasets` features of FashionMNIST: a grayscale Image and a ClassLabel with the ten names."""
    import datasets

    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))})


def fashion_mnist_dataset(split: str = "train", data_dir: Optional[str] = None):
    """Get a FashionMNIST split as a `datasets.Dataset` (image: Image, label: ClassLabel), held in memory."""
    import datasets

    found = _locate(split, data_dir)
    features = fashion_mnist_features()
    if found.dataset is None:
        images, labels = _read_idx_split(found.images_path, found.labels_path)
        # from_dict encodes each image as a PNG once (a few seconds for train); nothing is written to disk.
        return datasets.Dataset.from_dict({"image": list(images), "label": labels}, features=features,
                                          split=datasets.NamedSplit(split))
    dataset, source = found.dataset, found.source
    missing = {"image", "label"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{source}: dataset lacks column(s) {sorted(missing)}; expected 'image' and 'label'")
    dataset = dataset.select_columns(["image", "label"])
    if not isinstance(dataset.features["image"], datasets.Image):
        raise ValueError(f"{source}: column 'image' is {dataset.features['image']}, expected datasets.Image")
    if dataset.features["label"] != features["label"]:
        # Same integers, our names (the Hub copy spells the first class "T - shirt / top").
        dataset = dataset.cast_column("label", features["label"])
    return dataset


# ----------------------------------------------------------------------------------------------------------------
# Model input
# ----------------------------------------------------------------------------------------------------------------

def to_model_input(images: torch.Tensor, flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Turn uint8 images [B, 28, 28] into model input [B, 1, 32, 32] in [-1, 1]: pad, optionally mirror, scale."""
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must be uint8 [B, {IMAGE_SIZE}, {IMAGE_SIZE}], got {images.dtype} "
                         f"{list(images.shape)}")
    # Pad rather than resize: every FashionMNIST pixel reaches the model unchanged.
    padded = F.pad(images, (PADDING,) * 4, value=BACKGROUND)  # [B, 32, 32], still uint8 (4x less to move)
    return pixels_to_model_input(padded.unsqueeze(1), flip)  # [B, 1, 32, 32]


def pixels_to_model_input(pixels: torch.Tensor, flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Turn uint8 pixels [B, C, H, W] into model input in [-1, 1], mirroring the images `flip` (bool [B]) chooses."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4:
        raise ValueError(f"pixels must be uint8 [B, C, H, W], got {pixels.dtype} {list(pixels.shape)}")
    if flip is not None:
        if flip.dtype != torch.bool or tuple(flip.shape) != (len(pixels),):
            raise ValueError(f"flip must be bool [{len(pixels)}] (True mirrors that image), got {flip.dtype} "
                             f"{list(flip.shape)}")
        flip = flip.to(pixels.device, non_blocking=True)
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    # The same operations as torchvision's ToTensor then Normalize([0.5], [0.5]), so results match bit for bit.
    return pixels.float().div_(255).sub_(0.5).div_(0.5)


def crop_to_28(x: torch.Tensor) -> torch.Tensor:
    """Crop [..., 32, 32] model-sized images back to FashionMNIST's [..., 28, 28], undoing the padding."""
    if x.dim() < 2 or tuple(x.shape[-2:]) != (MODEL_SIZE, MODEL_SIZE):
        raise ValueError(f"crop_to_28 needs [..., {MODEL_SIZE}, {MODEL_SIZE}], got {list(x.shape)}")
    return x[..., PADDING:PADDING + IMAGE_SIZE, PADDING:PADDING + IMAGE_SIZE]


# ----------------------------------------------------------------------------------------------------------------
# Batch order
# ----------------------------------------------------------------------------------------------------------------

class ShardBatch(NamedTuple):
    """One process's share of one global batch."""

    indices: torch.Tensor  # int64 dataset indices for this rank
    start: int  # offset of this rank's slice inside the global batch
    global_size: int  # size of the global batch (all ranks together) for this step


class ShardedBatchSampler:
    """Seeded, resumable batch order over a data set, each global batch split across processes.

    Epoch e visits `torch.randperm(num_samples)` seeded with seed + e. Global batch k is the slice
    [k*G, (k+1)*G) of it, G = batch_size * world_size (the last one may be shorter: nothing is dropped), and
    rank r takes part r of `torch.tensor_split(global_batch, world_size)`. So every index is seen exactly once
    per epoch across ranks, and one process with batch 2B sees the same batches as two with batch B.

    Iterating yields the rest of the current epoch from `position`, then moves to the next epoch; a state
    with position == len(self) means the epoch is finished and iteration starts the next one.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size (per process) must be >= 1, got {batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    @property
    def global_batch_size(self) -> int:
        """Get the number of samples one step takes across all processes."""
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Get the number of global batches per epoch."""
        return -(-self.num_samples // self.global_batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Get the int64 permutation of all indices that epoch `epoch` visits."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[ShardBatch]:
        """Yield this rank's batches for the rest of the current epoch, then advance to the next epoch."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        order = self.epoch_order(self.epoch)
        size = self.global_batch_size
        while self.position < len(self):
            global_batch = order[self.position * size:(self.position + 1) * size]
            shares = torch.tensor_split(global_batch, self.world_size)
            start = sum(len(share) for share in shares[:self.rank])
            # Counted before the yield, so a checkpoint taken while this batch is used resumes after it.
            self.position += 1
            yield ShardBatch(shares[self.rank], start, len(global_batch))
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """Get the small state that, saved with a checkpoint, resumes the batch order exactly."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_samples": self.num_samples, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; the data set size and the global batch size must be unchanged.

        The process count may differ (batch_size x world_size staying the same): the global batches do not depend
        on how they are split.
        """
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}; pass the dict that state_dict() returned")
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"sampler state has num_samples={state['num_samples']} but this run has "
                             f"{self.num_samples}; resume with the same data")
        if state["batch_size"] * state["world_size"] != self.global_batch_size:
            raise ValueError(f"sampler state has global batches of {state['world_size']} x {state['batch_size']} but "
                             f"this run has {self.world_size} x {self.batch_size}; resume with the same global batch")
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"sampler state position {state['position']} is outside [0, {len(self)}]")
        if state["epoch"] < 0 or state["seed"] < 0:
            raise ValueError(f"sampler state epoch and seed must be >= 0, got {state['epoch']} and {state['seed']}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
