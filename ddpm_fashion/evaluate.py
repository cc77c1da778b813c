"""Sample quality, offline: FID, precision/recall and the class histogram against FashionMNIST; `ddpm-fashion evaluate`.

Protocol (every number in a report says how it was made):
    - Images: generated 32x32 images are cropped back to FashionMNIST's 28x28 (the padding is ours, not the data's)
      and quantised to uint8 like a saved PNG, so generated and real images take the same path into the features.
    - Features: `fmnist` (default, offline) are the pooled penultimate activations of the shipped FashionMNIST
      classifier (ddpm_fashion/classifier.py); `inception` are torchmetrics' standard 2048-d InceptionV3 pool
      features of the grey image repeated to three channels, resized to 299x299 with torchmetrics' default antialias.
    - FID: torchmetrics' FrechetInceptionDistance over those features, against the whole reference split (the
      FashionMNIST test set by default), whose features are computed once and cached.
    - Precision and recall: Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
      Models" (k = 3), computed by torch-fidelity on the same features, with as many reference images as samples.
    - Class histogram: the classifier's predictions on the images, and its KL divergence from uniform (in nats).
"""

import argparse
import hashlib
import importlib.util
import io
import json
import os
import pickle
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from ddpm_fashion.classifier import WEIGHTS_DIR, WEIGHTS_FILE, features_and_logits, load_classifier
from ddpm_fashion.cli import atomic_output, check_output_path, one_line, positive_int
from ddpm_fashion.data import CLASS_NAMES, IMAGE_SIZE, MODEL_SIZE, _hub_is_offline, crop_to_28, load_fashion_mnist

FEATURE_CHOICES = ("fmnist", "inception")
REAL_TRAIN = "real-train"
NEIGHBOURS = 3  # the k of k-NN precision and recall, as recommended by Kynkaanniemi et al. 2019
# k-NN radii need k + 1 points per set, and FID a covariance; below this many images neither means anything.
MIN_SAMPLES = 10
DEFAULT_NUM_SAMPLES = 10000
DEFAULT_BATCH_SIZE = 256
# A fixed seed for choosing the reference images of precision/recall, so every run of a table meets the same ones.
REFERENCE_SUBSET_SEED = 0
# Rows of the distance matrix precision/recall holds at once: 2000 x 10000 floats is 80 MB.
DISTANCE_CHUNK = 2000

CACHE_ENV = "DDPM_FASHION_CACHE"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "ddpm_fashion"

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


def _sha256_of_file(path: Path) -> str:
    """Get the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------

def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """Get uint8 [N, 1, 28, 28] images from float [N, 1, 28|32, 28|32] in [0, 1] or uint8 [N, (1,) 28, 28]."""
    if images.dtype == torch.uint8 and images.dim() == 3:
        images = images.unsqueeze(1)  # real FashionMNIST [N, 28, 28] -> [N, 1, 28, 28]
    sizes = ((IMAGE_SIZE, IMAGE_SIZE), (MODEL_SIZE, MODEL_SIZE))
    if images.dim() != 4 or images.shape[1] != 1 or tuple(images.shape[2:]) not in sizes:
        raise ValueError(f"images must be grey [N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}] or [N, 1, {MODEL_SIZE}, "
                         f"{MODEL_SIZE}], got {list(images.shape)}")
    if images.shape[-1] == MODEL_SIZE:
        images = crop_to_28(images)
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
    if images.numel() and (images.min() < 0 or images.max() > 1 or images.isnan().any()):
        raise ValueError(f"float images must lie in [0, 1], got values in [{images.min().item():.3g}, "
                         f"{images.max().item():.3g}]")
    # Rounded as a PNG writer rounds, so a generated image is scored as the file it would be saved to.
    return images.mul(255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors: modules mapping uint8 [N, 1, 28, 28] to float [N, D], with what a cache key and a report need
# ----------------------------------------------------------------------------------------------------------------

class ClassifierFeatures(nn.Module):
    """The FashionMNIST classifier's pooled penultimate activations (`fmnist` features)."""

    def __init__(self, classifier_dir=WEIGHTS_DIR):
        super().__init__()
        self.model = load_classifier(classifier_dir)
        self.num_features = self.model.config.hidden_sizes[-1]
        weights_hash = _sha256_of_file(Path(classifier_dir) / WEIGHTS_FILE)[:12]
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
        message = " ".join(str(error).split())[:200]
        raise ValueError(f"--inception_weights {path} is not a readable tensors-only state dict ({message}); "
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
        message = " ".join(str(error).split())
        raise FileNotFoundError(f"InceptionV3 FID weights could not be downloaded ({type(error).__name__}: "
                                f"{message}); {HOW_TO_GET_INCEPTION}") from None
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
            message = " ".join(str(error).split())[:300]
            raise ValueError(f"--inception_weights {weights_file} does not hold FID InceptionV3 weights "
                             f"({message}); {HOW_TO_GET_INCEPTION}") from None
        self.num_features = INCEPTION_FEATURES
        weights_hash = _sha256_of_file(weights_file)[:12]
        self.cache_key = f"inception{INCEPTION_FEATURES}-antialias{int(INCEPTION_ANTIALIAS)}-{weights_hash}"
        self.description = (f"InceptionV3 {INCEPTION_FEATURES}-d pool features (torchmetrics NoTrainInceptionV3, "
                            f"{weights_file.name} sha256 {weights_hash}), grey repeated to RGB, resized to 299x299 "
                            f"with antialias={INCEPTION_ANTIALIAS}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Get the features [N, 2048] of uint8 images [N, 1, 28, 28]."""
        return self.inception(images.expand(-1, 3, -1, -1))  # [N, 1, H, W] -> [N, 3, H, W], grey as RGB


def build_feature_extractor(features: str = "fmnist", inception_weights: Optional[str] = None) -> nn.Module:
    """Get the feature extractor named by --features, ready to run."""
    if features not in FEATURE_CHOICES:
        raise ValueError(f"features {features!r} is not supported; choose one of: {', '.join(FEATURE_CHOICES)}")
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


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics, computed once per extractor, split and data
# ----------------------------------------------------------------------------------------------------------------

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
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Written beside its final name and renamed into place, so a concurrent run never reads half a file.
        with atomic_output(path) as staging:
            save_file({"features": features.contiguous()}, staging,
                      metadata={"extractor": extractor.description, "split": split, "data_sha256": data_hash})
    except OSError as error:  # the cache only saves time; an unwritable one must not stop an evaluation
        print(f"warning: could not cache reference features in {folder} ({error})", file=sys.stderr)
    return features


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------

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


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, k: int = NEIGHBOURS) -> dict:
    """Get k-NN precision and recall (Kynkaanniemi et al. 2019) of generated features against reference ones."""
    if not TORCH_FIDELITY_AVAILABLE:
        raise ValueError(f"precision/recall needs torch-fidelity: {INSTALL_TORCH_FIDELITY}")
    from torch_fidelity.metric_prc import prc_features_to_metric

    for name, features in (("generated", generated), ("reference", reference)):
        if len(features) < k + 1:  # each point's ball reaches its k-th neighbour, itself not counted
            raise ValueError(f"precision/recall with k={k} needs at least {k + 1} {name} points, got {len(features)}")
    result = prc_features_to_metric(generated, reference, prc_neighborhood=k, prc_batch_size=DISTANCE_CHUNK,
                                    save_cpu_ram=True, verbose=False)
    return {"precision": result["precision"], "recall": result["recall"]}


def class_histogram(predictions: torch.Tensor) -> torch.Tensor:
    """Get the fraction [10] of predictions that falls in each class."""
    return torch.bincount(predictions, minlength=len(CLASS_NAMES)).double() / len(predictions)


def kl_from_uniform(histogram: torch.Tensor) -> float:
    """Get KL(histogram || uniform) in nats: 0 for perfectly balanced classes, log(10) for a single class."""
    uniform = 1.0 / len(histogram)
    # xlogy makes empty classes contribute 0, the limit of p log p.
    return torch.special.xlogy(histogram, histogram / uniform).sum().item()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------

class Evaluator:
    """Scores image sets against one reference split: holds the feature extractor, classifier and reference features."""

    def __init__(self, features: str = "fmnist", reference_split: str = "test", data_dir: Optional[str] = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, inception_weights: Optional[str] = None, device="cpu",
                 cache=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.features, self.reference_split, self.batch_size, self.device = features, reference_split, batch_size, device
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
        scores = precision_recall(generated[:subset_size], self.reference[chosen[:subset_size]])
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


def evaluate_images(images: torch.Tensor, features: str = "fmnist", reference_split: str = "test",
                    data_dir: Optional[str] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    inception_weights: Optional[str] = None, device="cpu", cache=None) -> dict:
    """Get FID, precision/recall and the class histogram of images [N, 1, 28|32, 28|32] in [0, 1] against a split."""
    evaluator = Evaluator(features, reference_split, data_dir, batch_size, inception_weights, device, cache)
    return evaluator.evaluate(images)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def real_training_images(num_samples: int, seed: int = 0, data_dir: Optional[str] = None) -> torch.Tensor:
    """Get num_samples training images chosen at random (seeded), uint8 [N, 1, 28, 28]: the real-data floor."""
    images, _ = load_fashion_mnist("train", data_dir)
    if num_samples > len(images):
        raise ValueError(f"--num_samples {num_samples} is more than the {len(images)} training images")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return images[chosen].unsqueeze(1)


def machine_description(device: torch.device) -> str:
    """Get a short description of the machine a timing was taken on."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


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


# ----------------------------------------------------------------------------------------------------------------
# Saved samples: a long sampling run (DDPM's 1000 steps on a CPU take hours) survives being stopped
# ----------------------------------------------------------------------------------------------------------------

SAMPLES_FORMAT = "ddpm_fashion evaluate samples v1"


def pipeline_fingerprint(model_dir) -> str:
    """Get the SHA-256 of a saved pipeline's files, so saved samples are only ever continued with the same model."""
    digest = hashlib.sha256()
    folder = Path(model_dir)
    for path in sorted(file for file in folder.rglob("*") if file.is_file() and not file.name.startswith(".")):
        if path.relative_to(folder).parts[0] not in ("unet", "scheduler", "model_index.json"):
            continue  # a trainer's checkpoints/ and logs/ beside the pipeline are not the model
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + _sha256_of_file(path).encode())
    return digest.hexdigest()


def load_samples(path: Path, settings: dict, num_samples: int, batch_size: int) -> Optional[dict]:
    """Get the images, generator state and timing saved by an earlier run of these settings (None if no file)."""
    if not path.exists():
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != SAMPLES_FORMAT:
                raise ValueError("no samples metadata")
            saved = {"images": handle.get_tensor("images"), "generator_state": handle.get_tensor("generator_state"),
                     "settings": json.loads(metadata["settings"]), "seconds": float(metadata["sampling_seconds"]),
                     "machine": metadata["machine"]}
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise ValueError(f"--samples_file {path} is not a samples file of `ddpm-fashion evaluate` ({one_line(error)}); "
                         f"give another path (an existing file is never overwritten)") from None
    for key, value in settings.items():
        if saved["settings"].get(key) != value:
            raise ValueError(f"--samples_file {path} holds samples made with {key} {saved['settings'].get(key)!r}, "
                             f"this run has {value!r}; give another path or the same settings")
    finished = len(saved["images"])
    # An uninterrupted run's first k images equal a k-image run's when k is whole batches; nothing else is reusable.
    if num_samples < finished and num_samples % batch_size:
        raise ValueError(f"--samples_file {path} holds {finished} images; --num_samples {num_samples} can only reuse "
                         f"them as a multiple of --batch_size {batch_size} (or all {finished})")
    if num_samples > finished and finished % batch_size:
        raise ValueError(f"--samples_file {path} holds a finished run of {finished} images; --num_samples must be at "
                         f"most {finished}, or give another path")
    return saved


def save_samples(path: Path, images: torch.Tensor, generator: torch.Generator, settings: dict, seconds: float,
                 machine: str) -> None:
    """Save generated images and the generator state after them, atomically, for `load_samples` to continue from."""
    metadata = {"format": SAMPLES_FORMAT, "settings": json.dumps(settings, sort_keys=True),
                "sampling_seconds": repr(seconds), "machine": machine}
    with atomic_output(path) as staging:
        save_file({"images": images.contiguous(), "generator_state": generator.get_state()}, staging,
                  metadata=metadata)


class SamplesFile:
    """A --samples_file: what an earlier run of the same settings saved, and a save after every batch (on_batch)."""

    def __init__(self, path: Path, settings: dict, num_samples: int, batch_size: int, machine: str):
        self.path, self.settings = path, settings
        self.saved = load_samples(path, settings, num_samples, batch_size)
        self.seconds_before = self.saved["seconds"] if self.saved is not None else 0.0
        previous = self.saved["machine"] if self.saved is not None else machine
        self.machine = previous if previous == machine else f"{previous} + {machine}"
        self.start_clock()

    def start_clock(self) -> float:
        """Start timing this run's sampling (not its set-up) and return the start time."""
        self.started = time.perf_counter()
        return self.started

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> None:
        seconds = self.seconds_before + time.perf_counter() - self.started
        save_samples(self.path, images, generator, self.settings, seconds, self.machine)


def open_samples_file(args: argparse.Namespace, num_inference_steps: int, device: torch.device) -> SamplesFile:
    """Get the --samples_file of this run, refusing one made with other settings (before any slow set-up)."""
    settings = {"model_sha256": pipeline_fingerprint(args.model), "sampler": args.scheduler,
                "num_inference_steps": num_inference_steps, "seed": args.seed, "batch_size": args.batch_size,
                "device": device.type}
    return SamplesFile(Path(args.samples_file), settings, args.num_samples, args.batch_size,
                       machine_description(device))


def generate_for_evaluation(pipe, args: argparse.Namespace, num_inference_steps: int, device: torch.device,
                            samples_file: Optional[SamplesFile] = None):
    """Get generated images [N, 1, H, W] and the timing fields of the report, continuing samples_file if given."""
    from ddpm_fashion.sampling import generate_images

    saved = samples_file.saved if samples_file is not None else None
    seconds = samples_file.seconds_before if samples_file is not None else 0.0
    machine = samples_file.machine if samples_file is not None else machine_description(device)
    if saved is not None and len(saved["images"]) >= args.num_samples:
        images, generated = saved["images"][:args.num_samples], len(saved["images"])
    else:
        if saved is not None:
            print(f"continuing from {len(saved['images'])} images in {samples_file.path}", file=sys.stderr)
        resume = (saved["images"], saved["generator_state"]) if saved is not None else None
        started = samples_file.start_clock() if samples_file is not None else time.perf_counter()
        images = generate_images(pipe, args.num_samples, args.batch_size, num_inference_steps, args.seed,
                                 resume=resume, on_batch=samples_file)
        seconds += time.perf_counter() - started
        generated = args.num_samples
    # Seconds are summed over every run that added to the samples, per image they made.
    return images, {"sampling_seconds": round(seconds, 2),
                    "seconds_per_1000_images": round(1000 * seconds / generated, 2), "machine": machine}


def run_evaluate(args: argparse.Namespace) -> int:
    """Generate (or take real training) images, score them against the test set, print and save the report."""
    from ddpm_fashion.sampling import DEFAULT_INFERENCE_STEPS, check_num_inference_steps, load_pipeline, resolve_device

    report_path = check_output_path(args.json, (".json",)) if args.json else None
    if args.samples_file:
        if args.model == REAL_TRAIN:
            raise ValueError(f"--samples_file keeps generated images; --model {REAL_TRAIN} generates none")
        check_output_path(args.samples_file, (".safetensors",))
    if args.num_samples < MIN_SAMPLES:
        raise ValueError(f"--num_samples must be at least {MIN_SAMPLES}, got {args.num_samples}")
    device = resolve_device(args.device)
    protocol = {"model": args.model, "seed": args.seed, "sampler": None, "num_inference_steps": None}
    if args.model == REAL_TRAIN:
        images = real_training_images(args.num_samples, args.seed, args.data_dir)
        pipe = None
    else:
        pipe = load_pipeline(args.model, scheduler=args.scheduler, device=device)
        steps = args.num_inference_steps
        if steps is None:
            steps = DEFAULT_INFERENCE_STEPS.get(args.scheduler)  # None: every training timestep
        protocol.update(sampler=args.scheduler, num_inference_steps=check_num_inference_steps(pipe, steps))
        samples_file = open_samples_file(args, protocol["num_inference_steps"], device) if args.samples_file else None
    # Everything that can fail fast (features, weights, reference data) is set up before minutes of sampling.
    evaluator = Evaluator(args.features, "test", args.data_dir, args.batch_size, args.inception_weights, device)
    if pipe is not None:
        images, timing = generate_for_evaluation(pipe, args, protocol["num_inference_steps"], device, samples_file)
        protocol.update(timing)
    report = {**protocol, **evaluator.evaluate(images)}
    print(format_report(report))
    if report_path:
        with atomic_output(report_path) as staging:
            staging.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote the report to {report_path}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `evaluate` subcommand to the CLI."""
    from ddpm_fashion.sampling import DEVICE_CHOICES, SCHEDULER_CHOICES

    parser = subparsers.add_parser("evaluate", help="FID, precision/recall and class balance against the test set")
    parser.add_argument("--model", required=True,
                        help=f"folder of a saved DDPMPipeline, or {REAL_TRAIN} to score real training images "
                             f"(the floor every table shows)")
    parser.add_argument("--num_samples", type=positive_int, default=DEFAULT_NUM_SAMPLES)
    parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default="own",
                        help="own/diffusers: DDPM; ddim, dpm (DPM-Solver++): fast samplers from the same config")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="sampling steps (default: all training steps for DDPM, 50 for ddim, 25 for dpm)")
    parser.add_argument("--features", choices=FEATURE_CHOICES, default="fmnist",
                        help="fmnist: the shipped FashionMNIST classifier (offline); inception: standard FID "
                             "InceptionV3")
    parser.add_argument("--inception_weights", default=None,
                        help=f"local FID InceptionV3 weights ({INCEPTION_FILE} or a .safetensors copy), for "
                             f"machines without internet")
    parser.add_argument("--batch_size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                        help="images per batch, for sampling and for features")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler, or of the choice of real images")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    parser.add_argument("--samples_file", default=None,
                        help="keep the generated images in this .safetensors file after every batch; rerunning the "
                             "same command continues an interrupted run where it stopped, with identical results")
    parser.add_argument("--data_dir", default=None, help="folder with the FashionMNIST IDX .gz files")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto picks CUDA when present")
    parser.set_defaults(func=run_evaluate)
    return parser
