"""Image folders and `datasets` datasets: torchvision's preprocessing bit for bit, modes, columns, errors, and
identical batches in memory and streamed, for any process count and after a resume (image folders written here)."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import SMOKE
from ddpm_fashion import image_datasets
from ddpm_fashion.data import ShardedBatchSampler, pixels_to_model_input
from ddpm_fashion.image_datasets import (
    IN_MEMORY_VARIABLE,
    UnreadableImageError,
    crop,
    crop_draws,
    open_training_data,
    resize_and_center,
)
from ddpm_fashion.training.config import parse_config


def write_images(folder, arrays, mode=None, suffix="png"):
    """Write uint8 arrays ([H, W] grey or [H, W, 3] colour) as image files named 000.png, 001.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        image = Image.fromarray(np.asarray(array, dtype=np.uint8))
        (image.convert(mode) if mode else image).save(folder / f"{i:03d}.{suffix}")
    return folder


def random_arrays(count, shape, seed=0):
    """Random uint8 pixel arrays of one shape."""
    return list(np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8))


def config_for(tmp_path, *extra):
    """The smoke config with the given data options; the `datasets` cache stays under tmp_path."""
    return parse_config(["--config", str(SMOKE), "--cache_dir", str(tmp_path / "cache"), *map(str, extra)])[0]


def batches_of(data, world_size, batch_size, epochs=2, rank=0, state=None):
    """Every (indices, pixels) this rank gets over `epochs` epochs, the sampler resumed from `state` when given."""
    sampler = ShardedBatchSampler(data.num_images, batch_size, seed=3, rank=rank, world_size=world_size)
    if state is not None:
        sampler.load_state_dict(state)
    out = []
    for _ in range(epochs):
        out += [(batch.indices.clone(), pixels.clone()) for batch, pixels in data.batches(sampler, torch.device("cpu"))]
    return out


def loaded(config, budget, monkeypatch, num_processes=1):
    """The run's data, loaded in memory (budget None) or streamed (budget 0)."""
    if budget is None:
        monkeypatch.delenv(IN_MEMORY_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(IN_MEMORY_VARIABLE, str(budget))
    data = open_training_data(config)
    how = data.load(config, torch.device("cpu"), num_processes)
    assert how.startswith("in memory" if budget is None else "streamed"), how
    return data


@pytest.fixture
def wide_rgb(tmp_path):
    """Nine 3-channel 12x20 images: resized to 16 they are 16x26, so a random crop has ten places to choose from."""
    return write_images(tmp_path / "wide", random_arrays(9, (12, 20, 3)))


# ---- preprocessing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("center_crop", [True, False])
def test_preprocessing_is_diffusers_torchvision_pipeline_bit_for_bit(center_crop):
    image = Image.fromarray(random_arrays(1, (30, 45, 3), seed=5)[0])
    draw = torch.tensor([0.3, 0.71])
    ours = resize_and_center(image, 16, center_crop)
    if not center_crop:
        ours = crop(ours, draw, 16)
    ours = pixels_to_model_input(ours[None], flip=torch.tensor([True]))[0]
    resized = TF.resize(image, 16, interpolation=T.InterpolationMode.BILINEAR)  # 16 x 24
    left = int(draw[1] * (24 - 16 + 1))
    cropped = TF.center_crop(resized, 16) if center_crop else TF.crop(resized, 0, left, 16, 16)
    theirs = T.Compose([T.RandomHorizontalFlip(p=1.0), T.ToTensor(), T.Normalize([0.5], [0.5])])(cropped)
    assert torch.equal(ours, theirs)


def test_crop_draws_depend_only_on_the_batch_place():
    assert torch.equal(crop_draws(1, 2, 3, 8), crop_draws(1, 2, 3, 8))
    assert not torch.equal(crop_draws(1, 2, 3, 8), crop_draws(1, 2, 4, 8))
    assert not torch.equal(crop_draws(1, 2, 3, 8), crop_draws(1, 3, 3, 8))
    assert not torch.equal(crop_draws(1, 2, 3, 8), crop_draws(2, 2, 3, 8))
    assert ((crop_draws(0, 0, 0, 1000) >= 0) & (crop_draws(0, 0, 0, 1000) < 1)).all()


# ---- modes, sizes, columns -------------------------------------------------------------------------------------

def test_grey_digits_train_as_one_channel_at_the_next_fitting_size(tmp_path, monkeypatch):
    """MNIST-like: 28x28 grey; the smoke U-Net (2 levels) takes 28, so the resolution is 28 unless asked."""
    folder = write_images(tmp_path / "digits", random_arrays(6, (28, 28)))
    data = loaded(config_for(tmp_path, "--train_data_dir", folder), None, monkeypatch)
    assert (data.channels, data.resolution, data.num_images) == (1, 28, 6)
    assert data.images.shape == (6, 1, 28, 28)
    assert torch.equal(data.images[2, 0], torch.from_numpy(np.array(Image.open(folder / "002.png"))))
    config = config_for(tmp_path, "--train_data_dir", folder, "--unet.block_out_channels", "[8, 8, 8, 8]",
                        "--unet.down_block_types", f"[{', '.join(['DownBlock2D'] * 4)}]",
                        "--unet.up_block_types", f"[{', '.join(['UpBlock2D'] * 4)}]")
    data = open_training_data(config)  # 4 levels halve three times: 28 is rounded up to 32
    assert (data.resolution, config.unet["sample_size"], config.unet["in_channels"], config.resolution) == \
        (32, 32, 1, 32)


@pytest.mark.parametrize("first_mode, channels", [("L", 1), ("RGB", 3), ("RGBA", 3), ("P", 3), ("LA", 1)])
def test_every_image_takes_the_first_images_mode(tmp_path, monkeypatch, first_mode, channels):
    folder = write_images(tmp_path / "mixed", random_arrays(1, (16, 16, 3)), mode=first_mode)
    Image.fromarray(random_arrays(1, (16, 16), seed=1)[0]).save(folder / "001.png")  # grey
    Image.fromarray(random_arrays(1, (16, 16, 3), seed=2)[0]).save(folder / "002.png")  # colour
    data = loaded(config_for(tmp_path, "--train_data_dir", folder), None, monkeypatch)
    assert data.channels == channels and data.images.shape == (3, channels, 16, 16)
    expected = Image.open(folder / "002.png").convert("L" if channels == 1 else "RGB")
    assert torch.equal(data.images[2], TF.pil_to_tensor(expected))


def test_a_3_channel_folder_at_64_pixels_asks_for_resolution_32(tmp_path, monkeypatch):
    folder = write_images(tmp_path / "big", random_arrays(4, (64, 64, 3)))
    config = config_for(tmp_path, "--train_data_dir", folder, "--resolution", 32)
    data = loaded(config, None, monkeypatch)
    assert data.images.shape == (4, 3, 32, 32) and config.unet["sample_size"] == 32
    expected = TF.pil_to_tensor(TF.resize(Image.open(folder / "001.png"), 32, T.InterpolationMode.BILINEAR))
    assert torch.equal(data.images[1], expected)


@pytest.mark.parametrize("column, as_dict", [("img", False), ("image", True)])
def test_dataset_name_reads_a_save_to_disk_folder(tmp_path, monkeypatch, column, as_dict):
    import datasets

    images = [Image.fromarray(a) for a in random_arrays(5, (16, 16, 3))]
    dataset = datasets.Dataset.from_dict({column: images, "label": list(range(5))},
                                         features=datasets.Features({column: datasets.Image(),
                                                                     "label": datasets.Value("int64")}))
    (datasets.DatasetDict({"train": dataset}) if as_dict else dataset).save_to_disk(str(tmp_path / "saved"))
    config = config_for(tmp_path, "--dataset_name", tmp_path / "saved")
    data = loaded(config, None, monkeypatch)
    assert data.images.shape == (5, 3, 16, 16)
    assert torch.equal(data.images[4], TF.pil_to_tensor(images[4]))
    assert config.dataset_name == str((tmp_path / "saved").resolve())  # recorded absolute, for resume


# ---- errors: one line each ---------------------------------------------------------------------------------------

def test_unreadable_image_is_named(tmp_path, monkeypatch):
    folder = write_images(tmp_path / "broken", random_arrays(3, (16, 16, 3)))
    (folder / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    config = config_for(tmp_path, "--train_data_dir", folder)
    data = open_training_data(config)
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*001\.png .*remove or replace it"):
        data.load(config, torch.device("cpu"))


@pytest.mark.parametrize("make, extra, message", [
    (lambda d: d.mkdir(), [], "is empty"),
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), [], "holds no images"),
    (lambda d: None, [], "is not a directory"),
    (lambda d: write_images(d, random_arrays(2, (16, 16, 3))), ["--resolution", 15], "not a multiple of 2"),
    (lambda d: write_images(d, random_arrays(2, (16, 16, 3))), ["--unet.in_channels", 1],
     r"in_channels 1 \(the data needs 3\)"),
    (lambda d: write_images(d, random_arrays(2, (16, 16, 3))), ["--resolution", 16, "--unet.sample_size", 32],
     r"sample_size 32 \(the data needs 16\)"),
])
def test_bad_folders_and_options_are_one_line(tmp_path, make, extra, message):
    folder = tmp_path / "data"
    make(folder)
    with pytest.raises(ValueError, match=message) as error:
        open_training_data(config_for(tmp_path, "--train_data_dir", folder, *extra))
    assert "\n" not in str(error.value)


def test_a_hub_name_offline_says_it_needs_the_network_or_a_saved_folder(tmp_path):
    with pytest.raises(ValueError, match="not found .*offline.*needs the network.*save_to_disk"):
        open_training_data(config_for(tmp_path, "--dataset_name", "no-such-user/no-such-dataset"))


# ---- batches: in memory == streamed, any process count, resumed ------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["--center_crop"]])
def test_streamed_batches_equal_in_memory_batches(tmp_path, monkeypatch, wide_rgb, extra):
    config = config_for(tmp_path, "--train_data_dir", wide_rgb, "--resolution", 16, *extra)
    in_memory = batches_of(loaded(config, None, monkeypatch), 1, 4)
    streamed = batches_of(loaded(config, 0, monkeypatch), 1, 4)
    assert len(in_memory) == 6 and all(p.shape[1:] == (3, 16, 16) for _, p in in_memory)
    for (i1, p1), (i2, p2) in zip(in_memory, streamed):
        assert torch.equal(i1, i2) and torch.equal(p1, p2)
    if not extra:  # random crops differ between epochs: the offsets come from the batch's place in the run
        first, second = torch.cat([p for _, p in in_memory[:3]]), torch.cat([p for _, p in in_memory[3:]])
        assert not torch.equal(first[torch.argsort(torch.cat([i for i, _ in in_memory[:3]]))],
                               second[torch.argsort(torch.cat([i for i, _ in in_memory[3:]]))])


def test_images_of_different_sizes_are_held_one_by_one(tmp_path, monkeypatch):
    folder = write_images(tmp_path / "sizes", random_arrays(3, (16, 24, 3)))
    write_images(tmp_path / "tall", random_arrays(2, (30, 16, 3), seed=4))
    for i in range(2):
        (tmp_path / "tall" / f"{i:03d}.png").rename(folder / f"tall-{i}.png")
    config = config_for(tmp_path, "--train_data_dir", folder, "--resolution", 16)
    in_memory = loaded(config, None, monkeypatch)
    assert isinstance(in_memory.images, list)
    streamed = loaded(config, 0, monkeypatch)
    for (_, p1), (_, p2) in zip(batches_of(in_memory, 1, 2), batches_of(streamed, 1, 2)):
        assert torch.equal(p1, p2) and p1.shape[1:] == (3, 16, 16)


@pytest.mark.parametrize("budget", [None, 0])
def test_two_processes_get_the_one_process_batches_split(tmp_path, monkeypatch, wide_rgb, budget):
    config = config_for(tmp_path, "--train_data_dir", wide_rgb, "--resolution", 16)
    data = loaded(config, budget, monkeypatch)
    one = batches_of(data, 1, 4)
    ranks = [batches_of(data, 2, 2, rank=rank) for rank in (0, 1)]
    for k, (indices, pixels) in enumerate(one):
        assert torch.equal(torch.cat([ranks[0][k][0], ranks[1][k][0]]), indices)
        assert torch.equal(torch.cat([ranks[0][k][1], ranks[1][k][1]]), pixels)


def test_a_resumed_stream_continues_with_the_same_batches_while_workers_read_ahead(tmp_path, monkeypatch, wide_rgb):
    config = config_for(tmp_path, "--train_data_dir", wide_rgb, "--resolution", 16, "--dataloader_num_workers", 1)
    data = loaded(config, 0, monkeypatch)
    straight = batches_of(data, 1, 2, epochs=2)
    sampler = ShardedBatchSampler(data.num_images, 2, seed=3)
    for k, _ in enumerate(data.batches(sampler, torch.device("cpu"))):
        if k == 2:  # the worker has read further than this; the sampler has not
            break
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (0, 3)
    resumed = batches_of(data, 1, 2, epochs=2, state=state)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(straight[3:], resumed))


def test_the_in_memory_limit_counts_every_process_of_the_machine(tmp_path, monkeypatch, wide_rgb):
    config = config_for(tmp_path, "--train_data_dir", wide_rgb, "--resolution", 16)
    size = open_training_data(config).estimated_bytes()
    assert size == 9 * 3 * 16 * 26
    monkeypatch.setenv(IN_MEMORY_VARIABLE, str(size))
    assert open_training_data(config).load(config, torch.device("cpu"), 1).startswith("in memory")
    assert open_training_data(config).load(config, torch.device("cpu"), 2).startswith("streamed")
    monkeypatch.setenv(IN_MEMORY_VARIABLE, "lots")
    with pytest.raises(ValueError, match=f"{IN_MEMORY_VARIABLE}='lots' must be a whole number of bytes"):
        image_datasets.in_memory_budget()
