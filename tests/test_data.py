"""FashionMNIST loading, model input and batch order, checked on small synthetic IDX files with known content."""
import gzip
import shutil

import datasets
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import write_idx, write_synthetic_fashion_mnist
from ddpm_fashion import data
from ddpm_fashion.data import (
    CLASS_NAMES,
    ShardBatch,
    ShardedBatchSampler,
    crop_to_28,
    fashion_mnist_dataset,
    load_fashion_mnist,
    to_model_input,
)

THREE_WAYS = ("apt-get install dataset-fashion-mnist", "--data_dir", data.HUB_DATASET_ID)


@pytest.fixture
def known_arrays():
    """Small splits whose every pixel and label we know."""
    rng = np.random.default_rng(1)
    return {"train": (rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), rng.integers(0, 10, 30, dtype=np.uint8)),
            "test": (rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7, dtype=np.uint8))}


def write_split_files(folder, arrays, compress):
    """Write both splits as IDX files named the way Zalando ships them."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[split]
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress=compress)
    return folder


def assert_split_equals(loaded, expected):
    """Check dtypes, shapes and every value of a loaded split."""
    images, labels = loaded
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    np.testing.assert_array_equal(images.numpy(), expected[0])
    np.testing.assert_array_equal(labels.numpy(), expected[1].astype(np.int64))


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Point the Debian location at an empty place, so only data_dir and the Hub are left."""
    monkeypatch.setattr(data, "DEBIAN_DIR", str(tmp_path / "no-debian-package-here"))


@pytest.fixture
def hub_online(monkeypatch, no_debian):
    """Clear the offline switches; each test replaces datasets.load_dataset so nothing reaches the network."""
    for name in data.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------------------------------------------
# Reading IDX files
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_files_read_exactly(tmp_path, known_arrays, compress, split):
    folder = write_split_files(tmp_path, known_arrays, compress)
    assert_split_equals(load_fashion_mnist(split, str(folder)), known_arrays[split])


def test_torchvision_layout_is_found(tmp_path, known_arrays):
    write_split_files(tmp_path / "FashionMNIST" / "raw", known_arrays, compress=False)
    assert_split_equals(load_fashion_mnist("test", str(tmp_path)), known_arrays["test"])


def test_raw_file_is_preferred_over_gz(tmp_path, known_arrays):
    write_split_files(tmp_path, known_arrays, compress=True)
    write_idx(tmp_path / "train-images-idx3-ubyte", known_arrays["train"][0][::-1], compress=False)
    images, _ = load_fashion_mnist("train", str(tmp_path))
    np.testing.assert_array_equal(images.numpy(), known_arrays["train"][0][::-1])


def test_debian_dir_is_used_without_data_dir(monkeypatch, tmp_path, known_arrays):
    monkeypatch.setattr(data, "DEBIAN_DIR", str(write_split_files(tmp_path, known_arrays, compress=True)))
    assert_split_equals(load_fashion_mnist("train"), known_arrays["train"])


def test_bad_split_is_refused(tmp_path, known_arrays):
    folder = write_split_files(tmp_path, known_arrays, compress=True)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'validation'"):
        load_fashion_mnist("validation", str(folder))


def corrupt_file(path, edit):
    """Rewrite a file's bytes through `edit`."""
    path.write_bytes(edit(path.read_bytes()))


def flip_byte(content, index):
    """Invert every bit of one byte."""
    return content[:index] + bytes([content[index] ^ 0xFF]) + content[index + 1:]


def gzip_of(edit_raw):
    """Turn an edit of the uncompressed bytes into an edit of a .gz file's bytes."""
    return lambda compressed: gzip.compress(edit_raw(gzip.decompress(compressed)))


@pytest.mark.parametrize("file_name, edit, problem", [
    ("train-images-idx3-ubyte.gz", lambda b: b[:len(b) // 2], "corrupt or truncated gzip"),
    ("train-images-idx3-ubyte.gz", lambda b: b"not gzip at all" + b, "corrupt or truncated gzip"),
    # A flipped byte mid-file breaks the deflate stream or its CRC-32; the CRC-32 starts 8 bytes from the end.
    ("train-images-idx3-ubyte.gz", lambda b: flip_byte(b, len(b) // 2), "corrupt or truncated gzip"),
    ("train-labels-idx1-ubyte.gz", lambda b: flip_byte(b, len(b) - 8), "corrupt or truncated gzip"),
    ("train-images-idx3-ubyte.gz", gzip_of(lambda b: b"\x00\x00\x08\x01" + b[4:]), "wrong magic number 0x00000801"),
    ("train-labels-idx1-ubyte.gz", gzip_of(lambda b: b"\x12\x34" + b[2:]), "wrong magic number 0x12340801"),
    ("train-images-idx3-ubyte.gz", gzip_of(lambda b: b[:-1]), "needs exactly"),
    ("train-images-idx3-ubyte.gz", gzip_of(lambda b: b + b"\x00"), "needs exactly"),
    ("train-labels-idx1-ubyte.gz", gzip_of(lambda b: b[:6]), "too short for a 1-dimension IDX header"),
    ("train-labels-idx1-ubyte.gz", gzip_of(lambda b: b[:3]), "too short for an IDX header"),
])
def test_corrupt_files_raise_naming_file_and_problem(tmp_path, known_arrays, file_name, edit, problem):
    folder = write_split_files(tmp_path, known_arrays, compress=True)
    corrupt_file(folder / file_name, edit)
    with pytest.raises(ValueError, match=problem) as raised:
        load_fashion_mnist("train", str(folder))
    assert file_name in str(raised.value)


def test_truncated_raw_file_raises(tmp_path, known_arrays):
    folder = write_split_files(tmp_path, known_arrays, compress=False)
    corrupt_file(folder / "t10k-images-idx3-ubyte", lambda b: b[:-28])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: 5476 bytes, but its header's shape "
                                         r"\(7, 28, 28\) needs exactly 5504"):
        load_fashion_mnist("test", str(folder))


def test_image_and_label_counts_must_match(tmp_path, known_arrays):
    folder = write_split_files(tmp_path, known_arrays, compress=True)
    write_idx(folder / "train-labels-idx1-ubyte.gz", known_arrays["train"][1][:29])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz \+ train-labels-idx1-ubyte.gz: 30 images "
                                         r"but 29 labels"):
        load_fashion_mnist("train", str(folder))


def test_wrong_image_size_raises(tmp_path, known_arrays):
    folder = write_split_files(tmp_path, known_arrays, compress=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((30, 27, 28)))
    with pytest.raises(ValueError, match=r"images have shape \(30, 27, 28\), expected \[N, 28, 28\]"):
        load_fashion_mnist("train", str(folder))


def test_labels_outside_the_ten_classes_raise(tmp_path, known_arrays):
    folder = write_split_files(tmp_path, known_arrays, compress=True)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 5, 10]))
    with pytest.raises(ValueError, match=r"labels range over \[0, 10\], expected 0..9"):
        load_fashion_mnist("test", str(folder))


def test_half_a_split_raises_naming_the_missing_file(tmp_path, known_arrays):
    folder = write_split_files(tmp_path, known_arrays, compress=True)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"only half of the test split, t10k-labels-idx1-ubyte\[.gz\] is "
                                                r"missing"):
        load_fashion_mnist("test", str(folder))


# ----------------------------------------------------------------------------------------------------------------
# Finding the data: data_dir, Debian, Hub, and the one error when all fail
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_dir", [lambda tmp: tmp / "does-not-exist", lambda tmp: tmp],
                         ids=["missing-dir", "empty-dir"])
def test_data_dir_without_data_names_all_three_ways(tmp_path, make_dir):
    with pytest.raises(FileNotFoundError) as raised:
        load_fashion_mnist("train", str(make_dir(tmp_path)))
    assert str(tmp_path) in str(raised.value)
    for way in THREE_WAYS:
        assert way in str(raised.value)


def test_nothing_found_offline_names_all_three_ways_and_skips_hub(monkeypatch, no_debian):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub must not be asked while offline")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(FileNotFoundError, match="the Hub is offline") as raised:
        load_fashion_mnist("train")
    for way in THREE_WAYS:
        assert way in str(raised.value)


def test_hub_failure_names_all_three_ways(monkeypatch, hub_online):
    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(FileNotFoundError, match="no route to huggingface.co") as raised:
        load_fashion_mnist("test")
    for way in THREE_WAYS:
        assert way in str(raised.value)


def hub_style_dataset(images, labels):
    """A Dataset shaped like the Hub copy, whose first class name is spelled differently from ours."""
    names = ["T - shirt / top", *CLASS_NAMES[1:]]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": list(images), "label": labels}, features=features)


def test_hub_is_the_last_resort(monkeypatch, hub_online, known_arrays):
    asked = []

    def fake_load_dataset(name, split, cache_dir):
        asked.append((name, split, cache_dir))
        return hub_style_dataset(*known_arrays[split])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert_split_equals(load_fashion_mnist("test"), known_arrays["test"])
    dataset = fashion_mnist_dataset("test")
    assert asked == [(data.HUB_DATASET_ID, "test", None)] * 2
    load_fashion_mnist("train", cache_dir="/the/trainers/--cache_dir")  # diffusers' --cache_dir: where a download goes
    assert asked[-1] == (data.HUB_DATASET_ID, "train", "/the/trainers/--cache_dir")
    assert dataset.features["label"].names == list(CLASS_NAMES)
    assert dataset["label"] == known_arrays["test"][1].tolist()


def test_save_to_disk_dataset_dict_round_trips(tmp_path, known_arrays):
    saved = datasets.DatasetDict({split: hub_style_dataset(*arrays) for split, arrays in known_arrays.items()})
    saved.save_to_disk(str(tmp_path / "saved"))
    for split in ("train", "test"):
        assert_split_equals(load_fashion_mnist(split, str(tmp_path / "saved")), known_arrays[split])


def test_save_to_disk_single_dataset_serves_its_own_split_only(tmp_path, known_arrays):
    dataset = hub_style_dataset(*known_arrays["test"])
    dataset.save_to_disk(str(tmp_path / "unnamed"))
    assert_split_equals(load_fashion_mnist("train", str(tmp_path / "unnamed")), known_arrays["test"])
    named = datasets.Dataset.from_dict(dataset.to_dict(), features=dataset.features, split=datasets.Split.TEST)
    named.save_to_disk(str(tmp_path / "named"))
    assert_split_equals(load_fashion_mnist("test", str(tmp_path / "named")), known_arrays["test"])
    with pytest.raises(ValueError, match="saved Dataset is the 'test' split, not 'train'"):
        load_fashion_mnist("train", str(tmp_path / "named"))


def test_save_to_disk_dict_without_the_split_raises(tmp_path, known_arrays):
    datasets.DatasetDict({"train": hub_style_dataset(*known_arrays["train"])}).save_to_disk(str(tmp_path))
    with pytest.raises(ValueError, match=r"saved DatasetDict has splits \['train'\], not 'test'"):
        load_fashion_mnist("test", str(tmp_path))


def test_saved_rgb_images_are_refused(tmp_path, known_arrays):
    images, labels = known_arrays["test"]
    hub_style_dataset(np.repeat(images[..., None], 3, axis=-1), labels).save_to_disk(str(tmp_path))
    with pytest.raises(ValueError, match=r"images have shape \(7, 28, 28, 3\), expected \[N, 28, 28\] grayscale"):
        load_fashion_mnist("test", str(tmp_path))


def test_datasets_version_has_ecosystem_features(tmp_path, known_arrays):
    folder = write_split_files(tmp_path, known_arrays, compress=True)
    dataset = fashion_mnist_dataset("train", str(folder))
    assert isinstance(dataset, datasets.Dataset) and len(dataset) == 30 and dataset.split == "train"
    assert isinstance(dataset.features["image"], datasets.Image)
    assert dataset.features["label"].names == list(CLASS_NAMES)
    assert dataset.cache_files == []  # held in memory: nothing written next to the data or in a cache
    for i in (0, 17, 29):
        row = dataset[i]
        assert row["image"].mode == "L"
        np.testing.assert_array_equal(np.asarray(row["image"]), known_arrays["train"][0][i])
        assert row["label"] == known_arrays["train"][1][i]


# ----------------------------------------------------------------------------------------------------------------
# Model input: pad, flip, scale
# ----------------------------------------------------------------------------------------------------------------

def test_model_input_values_padding_and_scale():
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[0, 0, 0], images[0, 27, 27], images[1, 5, 9] = 255, 51, 128
    x = to_model_input(images)
    assert x.shape == (2, 1, 32, 32) and x.dtype == torch.float32
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, 0][:, border] == -1).all()  # padding is the background, black
    assert x[0, 0, 2, 2] == 1.0 and x[0, 0, 29, 29] == pytest.approx(51 / 127.5 - 1, abs=1e-7)
    assert x[1, 0, 7, 11] == pytest.approx(128 / 127.5 - 1, abs=1e-7)
    assert (x == -1).sum() == 2 * 32 * 32 - 3


def test_flip_mirrors_only_the_chosen_images():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    flip = torch.tensor([True, False, False, True])
    flipped, plain = to_model_input(images, flip), to_model_input(images)
    assert torch.equal(flipped[flip], plain[flip].flip(-1))
    assert torch.equal(flipped[~flip], plain[~flip])
    assert not torch.equal(flipped[0], plain[0])


def test_model_input_equals_torchvision_pipeline_bit_for_bit():
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    flip = torch.tensor([True, False, True, True, False, False])
    pipeline = T.Compose([T.Pad(2, fill=0), T.ToTensor(), T.Normalize([0.5], [0.5])])
    expected = torch.stack([pipeline(TF.hflip(Image.fromarray(image.numpy())) if mirror
                                     else Image.fromarray(image.numpy())) for image, mirror in zip(images, flip)])
    assert torch.equal(to_model_input(images, flip), expected)


def test_crop_to_28_undoes_the_padding_exactly():
    images = torch.arange(3 * 28 * 28).remainder(256).to(torch.uint8).reshape(3, 28, 28)
    cropped = crop_to_28(to_model_input(images))
    assert cropped.shape == (3, 1, 28, 28)
    assert torch.equal(((cropped[:, 0] + 1) * 127.5).round().to(torch.uint8), images)
    assert crop_to_28(torch.zeros(32, 32)).shape == (28, 28)


@pytest.mark.parametrize("images, flip, problem", [
    (torch.zeros(2, 28, 28), None, r"images must be uint8 \[B, 28, 28\], got torch.float32 \[2, 28, 28\]"),
    (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), None, r"got torch.uint8 \[2, 1, 28, 28\]"),
    (torch.zeros(2, 32, 32, dtype=torch.uint8), None, r"got torch.uint8 \[2, 32, 32\]"),
    (torch.zeros(2, 28, 28, dtype=torch.uint8), torch.ones(2), r"flip must be bool \[2\].*torch.float32 \[2\]"),
    (torch.zeros(2, 28, 28, dtype=torch.uint8), torch.ones(3, dtype=torch.bool), r"flip must be bool \[2\]"),
])
def test_model_input_refuses_bad_input(images, flip, problem):
    with pytest.raises(ValueError, match=problem):
        to_model_input(images, flip)


def test_crop_refuses_wrong_size():
    with pytest.raises(ValueError, match=r"crop_to_28 needs \[..., 32, 32\], got \[1, 28, 28\]"):
        crop_to_28(torch.zeros(1, 28, 28))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to check the batch stays on it")
def test_model_input_stays_on_the_gpu():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    flip = torch.tensor([True, False, True, False])  # on the CPU, as the trainer may pass it
    on_gpu = to_model_input(images.cuda(), flip)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), to_model_input(images, flip))


# ----------------------------------------------------------------------------------------------------------------
# Batch order: sharding, determinism, resume
# ----------------------------------------------------------------------------------------------------------------

def one_epoch(sampler):
    """Collect the batches of one pass over a sampler."""
    return list(sampler)


def global_batches(num_samples, batch_size, world_size, seed=0):
    """Reassemble each step's global batch from every rank's share, checking the shares fit together."""
    per_rank = [one_epoch(ShardedBatchSampler(num_samples, batch_size, seed, rank, world_size))
                for rank in range(world_size)]
    assembled = []
    for shares in zip(*per_rank):
        sizes = {share.global_size for share in shares}
        assert len(sizes) == 1, "ranks disagree about the global batch size"
        offset = 0
        for share in shares:
            assert share.start == offset and share.indices.dtype == torch.int64
            offset += len(share.indices)
        assert offset == shares[0].global_size
        assembled.append(torch.cat([share.indices for share in shares]))
    assert len({len(batches) for batches in per_rank}) == 1, "ranks disagree about the number of steps"
    return assembled


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("num_samples", [60, 61, 100, 5])
def test_ranks_cover_every_index_exactly_once(num_samples, world_size):
    batches = global_batches(num_samples, batch_size=8, world_size=world_size)
    seen = torch.cat(batches)
    assert torch.equal(seen.sort().values, torch.arange(num_samples))
    assert len(batches) == len(ShardedBatchSampler(num_samples, 8, world_size=world_size))
    assert len(batches) == -(-num_samples // (8 * world_size))


@settings(max_examples=60, deadline=None)
@given(num_samples=st.integers(1, 150), batch_size=st.integers(1, 12), world_size=st.integers(1, 4),
       seed=st.integers(0, 2**32))
def test_order_is_the_documented_permutation(num_samples, batch_size, world_size, seed):
    seen = torch.cat(global_batches(num_samples, batch_size, world_size, seed))
    expected = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(seen, expected)


def test_one_process_with_double_batch_equals_two_processes():
    single = [batch.indices for batch in one_epoch(ShardedBatchSampler(101, 16, seed=3))]
    double = global_batches(101, 8, world_size=2, seed=3)
    assert len(single) == len(double) == 7
    for a, b in zip(single, double):
        assert torch.equal(a, b)


def test_single_process_batches_are_full_except_the_last():
    batches = one_epoch(ShardedBatchSampler(10, 4))
    assert [len(b.indices) for b in batches] == [4, 4, 2]
    assert [b.global_size for b in batches] == [4, 4, 2] and all(b.start == 0 for b in batches)
    assert isinstance(batches[0], ShardBatch)


def test_loops_move_through_epochs_with_new_orders():
    sampler = ShardedBatchSampler(50, 8, seed=7)
    epochs = [torch.cat([b.indices for b in sampler]) for _ in range(3)]
    assert sampler.epoch == 3 and sampler.position == 0
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    for epoch, order in enumerate(epochs):
        assert torch.equal(order, torch.randperm(50, generator=torch.Generator().manual_seed(7 + epoch)))
    assert torch.equal(epochs[0], torch.cat([b.indices for b in ShardedBatchSampler(50, 8, seed=7)]))


def test_position_counts_batches_as_they_are_yielded():
    sampler = ShardedBatchSampler(20, 5)
    positions = [(sampler.epoch, sampler.position) for _ in sampler]
    assert positions == [(0, 1), (0, 2), (0, 3), (0, 4)]  # the trainer reads position == len at the last batch
    assert (sampler.epoch, sampler.position) == (1, 0)


@pytest.mark.parametrize("stop_after", [0, 1, 4, 6, 7])
@pytest.mark.parametrize("world_size, rank", [(1, 0), (3, 2)])
def test_resume_gives_the_same_batches_as_an_uninterrupted_run(stop_after, world_size, rank):
    uninterrupted = ShardedBatchSampler(83, 4, seed=11, rank=rank, world_size=world_size)
    epoch_length = len(uninterrupted)
    expected = [b.indices for _ in range(3) for b in uninterrupted]  # three whole epochs

    first = ShardedBatchSampler(83, 4, seed=11, rank=rank, world_size=world_size)
    before = []
    if stop_after:
        for batch in first:
            before.append(batch.indices)
            if len(before) == stop_after:
                break  # the process dies here, after checkpointing
    state = first.state_dict()
    assert state == {"seed": 11, "epoch": 0, "position": stop_after, "num_samples": 83, "batch_size": 4,
                     "world_size": world_size}

    resumed = ShardedBatchSampler(83, 4, seed=0, rank=rank, world_size=world_size)
    resumed.load_state_dict(state)
    # Two more loops: the rest of epoch 0 (nothing, when it had ended) and then the next epoch.
    got = before + [b.indices for b in resumed] + [b.indices for b in resumed]
    whole_epochs = 3 if stop_after == epoch_length else 2
    assert len(got) == whole_epochs * epoch_length
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("before, after", [((1, 12), (2, 6)), ((1, 12), (3, 4)), ((2, 6), (1, 12))])
def test_a_resumed_order_split_over_another_process_count_continues_the_same_global_batches(before, after):
    """N processes x batch B see the batches of one with N*B, so a checkpoint's position carries across counts."""
    first = ShardedBatchSampler(83, before[1], seed=5, world_size=before[0])
    for position, _ in enumerate(first, start=1):
        if position == 3:
            break
    state = first.state_dict()
    resumed = [ShardedBatchSampler(83, after[1], seed=0, rank=rank, world_size=after[0]) for rank in range(after[0])]
    for sampler in resumed:
        sampler.load_state_dict(state)
    got = [torch.cat([b.indices for b in batches]) for batches in zip(*resumed)]
    straight = [b.indices for b in ShardedBatchSampler(83, 12, seed=5)][3:]
    assert len(got) == len(straight) == 4
    for a, b in zip(got, straight):
        assert torch.equal(a, b)


def test_finished_epoch_state_resumes_with_the_next_epoch():
    sampler = ShardedBatchSampler(30, 10, seed=2)
    sampler.load_state_dict({"seed": 2, "epoch": 4, "position": 3, "num_samples": 30, "batch_size": 10,
                             "world_size": 1})
    order = torch.cat([b.indices for b in sampler])
    assert torch.equal(order, torch.randperm(30, generator=torch.Generator().manual_seed(2 + 5)))
    assert (sampler.epoch, sampler.position) == (6, 0)


@pytest.mark.parametrize("change, problem", [
    ({"num_samples": 31}, "num_samples=31 but this run has 30"),
    ({"batch_size": 5}, "global batches of 1 x 5 but this run has 1 x 10"),
    ({"world_size": 2}, "global batches of 2 x 10 but this run has 1 x 10"),
    ({"position": 4}, r"position 4 is outside \[0, 3\]"),
    ({"position": -1}, r"position -1 is outside \[0, 3\]"),
    ({"epoch": -1}, "epoch and seed must be >= 0"),
])
def test_load_state_dict_refuses_a_different_run(change, problem):
    sampler = ShardedBatchSampler(30, 10)
    state = {**sampler.state_dict(), **change}
    with pytest.raises(ValueError, match=problem):
        sampler.load_state_dict(state)
    assert sampler.state_dict() == ShardedBatchSampler(30, 10).state_dict()  # untouched


def test_load_state_dict_refuses_missing_keys():
    with pytest.raises(ValueError, match=r"sampler state lacks \['position'\]"):
        ShardedBatchSampler(30, 10).load_state_dict({"seed": 0, "epoch": 0, "num_samples": 30, "batch_size": 10,
                                                     "world_size": 1})


@pytest.mark.parametrize("kwargs, problem", [
    ({"num_samples": 0, "batch_size": 4}, "num_samples must be >= 1, got 0"),
    ({"num_samples": 10, "batch_size": 0}, r"batch_size \(per process\) must be >= 1, got 0"),
    ({"num_samples": 10, "batch_size": 4, "world_size": 0}, "world_size must be >= 1, got 0"),
    ({"num_samples": 10, "batch_size": 4, "rank": 2, "world_size": 2}, r"rank must be in \[0, world_size=2\), got 2"),
    ({"num_samples": 10, "batch_size": 4, "rank": -1}, r"rank must be in \[0, world_size=1\), got -1"),
    ({"num_samples": 10, "batch_size": 4, "seed": -1}, "seed must be >= 0, got -1"),
])
def test_sampler_refuses_bad_arguments(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        ShardedBatchSampler(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The real data set (the Debian package; CI installs it)
# ----------------------------------------------------------------------------------------------------------------

def test_real_data_shapes_and_class_balance(real_data_dir):
    for split, size in (("train", 60000), ("test", 10000)):
        images, labels = load_fashion_mnist(split, real_data_dir)
        assert images.shape == (size, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (size,) and labels.dtype == torch.int64
        assert labels.bincount().tolist() == [size // 10] * 10
        assert images.min() == 0 and images.max() == 255
    assert load_fashion_mnist("train", real_data_dir)[1][:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def test_real_data_is_the_default_source(monkeypatch, real_data_dir):
    monkeypatch.setattr(data, "DEBIAN_DIR", real_data_dir)
    images, labels = load_fashion_mnist("test")
    assert torch.equal(images, load_fashion_mnist("test", real_data_dir)[0]) and len(labels) == 10000


def test_real_data_as_a_dataset(real_data_dir, tmp_path):
    # A copy of the test split under torchvision's raw layout, to read the same bytes a second way.
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(f"{real_data_dir}/{name}", raw / name)
    images, labels = load_fashion_mnist("test", real_data_dir)
    dataset = fashion_mnist_dataset("test", str(tmp_path))
    assert len(dataset) == 10000 and dataset.features["label"].int2str(int(labels[0])) == "Ankle boot"
    for i in (0, 4321, 9999):
        np.testing.assert_array_equal(np.asarray(dataset[i]["image"]), images[i].numpy())
        assert dataset[i]["label"] == labels[i]


def test_synthetic_conftest_data_loads(tmp_path):
    folder = write_synthetic_fashion_mnist(tmp_path, num_train=40, num_test=20)
    images, labels = load_fashion_mnist("train", folder)
    assert images.shape == (40, 28, 28) and labels.bincount().tolist() == [4] * 10
