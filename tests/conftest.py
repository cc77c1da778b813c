"""Shared fixtures. Tests never touch the network: the Hub is switched off before anything imports it."""
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_DIR = str(ROOT / "benchmarks")
SCRIPT = ROOT / "train_accelerate.py"
SMOKE = ROOT / "configs" / "smoke.yaml"
# The environment a user has: no device, launcher or thread variables (tests stay fast through small configs).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# .ci/run sets this: there the real full-disk tests must run, not skip.
REQUIRE_TMPFS = "DDPM_FASHION_REQUIRE_TMPFS"
# The tests that start several processes of one run (torchrun, accelerate --multi_gpu): they run one after another on
# one pytest-xdist worker, as some rendezvous on the launchers' fixed default port 29500, as a user's command does.
MULTI_PROCESS = pytest.mark.xdist_group("multi_process")


def load_benchmark(name):
    """Import benchmarks/<name>.py (a script folder, not a package) as a module."""
    import importlib.util

    if BENCHMARKS_DIR not in sys.path:  # the scripts import their shared studies.py, as they do when run
        sys.path.insert(0, BENCHMARKS_DIR)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same global RNG state, so a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Small models run fastest on one thread, and then never fight other test processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def real_data_dir():
    """The Debian package's FashionMNIST folder, or a skip that says how to get it."""
    if not os.path.isdir(FASHION_MNIST_DEBIAN_DIR):
        pytest.skip("real FashionMNIST absent: apt-get install dataset-fashion-mnist puts it in "
                    f"{FASHION_MNIST_DEBIAN_DIR}")
    return FASHION_MNIST_DEBIAN_DIR


def write_idx(path, array, compress=True):
    """Write a numpy uint8 array as an IDX file (the FashionMNIST format), gzipped or raw."""
    import gzip
    import struct

    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_synthetic_fashion_mnist(folder, num_train=256, num_test=64, seed=0):
    """Four small IDX files with random images and balanced labels, laid out like the real data set."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for split, n in (("train", num_train), ("t10k", num_test)):
        write_idx(f"{folder}/{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(f"{folder}/{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return str(folder)


@contextmanager
def mounted_tmpfs(folder, size):
    """Mount a real small file system (tmpfs of `size`, e.g. "256k") on a new folder, to fill for real.

    Mounting needs root on Linux; elsewhere the test is skipped saying so, except under .ci/run, where it fails.
    """
    folder = Path(folder)
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True) if shutil.which("mount") else None
    if done is None or done.returncode != 0:
        reason = f"cannot mount a {size} tmpfs to fill ({done.stderr.strip() if done else 'no mount command'})"
        if os.environ.get(REQUIRE_TMPFS):
            pytest.fail(f"{REQUIRE_TMPFS} is set but {reason}")
        pytest.skip(f"{reason}: a real full disk needs root on Linux")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(folder, leave_bytes=0):
    """Write a dummy file into folder until its file system has about `leave_bytes` free (0: not one byte)."""
    import errno

    with open(Path(folder) / "filler", "ab", buffering=0) as handle:
        if leave_bytes:
            handle.write(b"\0" * max(0, shutil.disk_usage(folder).free - leave_bytes))
            return
        for block in (65536, 4096, 1):
            try:
                while True:
                    handle.write(b"\0" * block)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory):
    """The real data when installed, otherwise small synthetic IDX files, so training tests always run."""
    if os.path.isdir(FASHION_MNIST_DEBIAN_DIR):
        return FASHION_MNIST_DEBIAN_DIR
    return write_synthetic_fashion_mnist(tmp_path_factory.mktemp("synthetic-fashion-mnist"))


# ---------------------------------------------------------------------------------------------------------------
# The trainer, run as users run it
# ---------------------------------------------------------------------------------------------------------------

def run_training(output_dir, data_dir, *extra, launcher=(sys.executable,), script=SCRIPT, expect=0, env=None):
    """Run the trainer on the smoke config in a subprocess; fail the test with its output unless it exits `expect`."""
    command = [*launcher, str(script), "--config", str(SMOKE), "--output_dir", str(output_dir),
               "--data_dir", str(data_dir), *map(str, extra)]
    result = subprocess.run(command, env=env or ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, f"{command} exited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                        f"{result.stderr[-3000:]}"
    return result


def train_in_process(output_dir, data_dir, *extra):
    """Run the trainer's main() in this process (saves the interpreter start-up of a subprocess)."""
    sys.path.insert(0, str(ROOT))
    import train_accelerate

    args = ["--config", str(SMOKE), "--output_dir", str(output_dir), "--data_dir", str(data_dir), *map(str, extra)]
    code = train_accelerate.main(args)
    assert code == 0, f"train_accelerate.main({args}) returned {code}"


def trainer_state(output_dir, step):
    """The trainer state saved with checkpoint-<step>."""
    return json.loads((Path(output_dir) / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())


def checkpoint_tensors(output_dir, step):
    """Model and EMA weights of checkpoint-<step>."""
    from safetensors.torch import load_file

    folder = Path(output_dir) / "checkpoints" / f"checkpoint-{step}"
    return load_file(folder / "model.safetensors"), load_file(folder / "ema.safetensors")


def error_line(err):
    """The one error line of a failed run (a progress bar may precede it; nothing may follow it)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("train_accelerate.py: error: "), err[-2000:]
    assert err.count("error:") == 1 and "Traceback" not in err, err[-2000:]
    return lines[-1]


def tree(folder):
    """Every file under a folder with its bytes, to prove a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, train_data_dir):
    """One smoke training run shared by the tests that only read its outputs (checkpoints 8 and 12, a pipeline)."""
    output_dir = tmp_path_factory.mktemp("smoke") / "out"
    result = run_training(output_dir, train_data_dir, "--checkpointing_steps", 4)
    return output_dir, result


@pytest.fixture
def run_copy(smoke_run, tmp_path):
    """A private copy of the shared smoke run to break or continue."""
    copy = tmp_path / "run"
    shutil.copytree(smoke_run[0], copy)
    return copy


# ---------------------------------------------------------------------------------------------------------------
# The `ddpm-fashion` CLI, run in this process on a tiny random pipeline
# ---------------------------------------------------------------------------------------------------------------

SIZE = 16  # tiny images keep every U-Net forward in the millisecond range
BIG_SEED = "99999999999999999999"  # more than any seed torch takes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved DDPMPipeline with a small random UNet2DModel (one attention level) and the 1000-step schedule."""
    from diffusers import DDPMPipeline, UNet2DModel
    from diffusers import DDPMScheduler as LibraryDDPMScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    DDPMPipeline(unet=unet, scheduler=LibraryDDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return str(folder)


def run_cli(argv, capsys):
    """Run the CLI in-process; get (exit code, stdout, stderr)."""
    from ddpm_fashion.cli import main

    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def copy_model(model_dir, tmp_path, name="model"):
    """A private copy of the tiny pipeline, so a case that damages it cannot damage the others."""
    folder = tmp_path / name
    shutil.copytree(model_dir, folder)
    return folder


def snapshot(folder):
    """Every file under a folder with its bytes."""
    return {path.relative_to(folder): path.read_bytes() for path in sorted(Path(folder).rglob("*")) if path.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Sample quality: an Evaluator against the real test set, and a tiny random 32x32 pipeline whose images it scores
# ---------------------------------------------------------------------------------------------------------------

NUM_IMAGES = 1000  # enough for stable FID ranks of a 128-d feature, few enough to stay fast


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    """One cache folder for the whole module, so the test set's features are computed once."""
    return tmp_path_factory.mktemp("reference-cache")


@pytest.fixture(scope="module")
def built_evaluators():
    """Evaluators built so far in this module: building one extracts the features of the whole test set."""
    return {}


@pytest.fixture
def evaluator(real_data_dir, reference_cache, built_evaluators):
    """An fmnist Evaluator against the real test set, built once per module."""
    from ddpm_fashion.evaluation import sample_quality

    if real_data_dir not in built_evaluators:
        built_evaluators[real_data_dir] = sample_quality.Evaluator(data_dir=real_data_dir, cache=reference_cache)
    return built_evaluators[real_data_dir]


@pytest.fixture
def real_images(real_data_dir):
    """NUM_IMAGES real training images as floats [N, 1, 28, 28] in [0, 1], as a generator would return them."""
    from ddpm_fashion.evaluation import sample_quality

    return sample_quality.real_training_images(NUM_IMAGES, seed=1, data_dir=real_data_dir).float() / 255


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A saved DDPMPipeline with a tiny random 32x32 U-Net: its images are noise, but they go the generated path."""
    from diffusers import DDPMPipeline, UNet2DModel
    from diffusers import DDPMScheduler as LibraryDDPMScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    DDPMPipeline(unet=unet, scheduler=LibraryDDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder
