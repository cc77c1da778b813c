"""Our UNet as a diffusers model: what it inherits from ModelMixin (files, dtypes, gradient checkpointing, config
attribute warnings) behaves as for UNet2DModel, with UNet2DModel's numbers, while loading stays strict.

Tolerances are those of test_unet.py: outputs within 1e-5 relative of UNet2DModel's, and exact where the same
kernels run (reference mode, file round trips, gradient checkpointing).
"""

import argparse
import json
import logging
import os

import pytest
import torch
import yaml
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from test_unet import CONFIGS, as_json, assert_outputs_equal, model_pair, randomize_, relative_error, sample_for

from ddpm_fashion.models.unet import UNet
from ddpm_fashion.models.unet_blocks import AttentionBlock

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# diffusers' own UNet2DModel test config (tests/models/unets/test_models_unet_2d.py): 3-wide heads in 8 channels.
DIFFUSERS_TEST_CONFIG = dict(
    block_out_channels=(4, 8), norm_num_groups=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=3, out_channels=3, in_channels=3,
    layers_per_block=2, sample_size=32)


def same_tensors(model, other):
    """Whether two models hold the same tensors under the same names, bit for bit."""
    state, other_state = model.state_dict(), other.state_dict()
    return state.keys() == other_state.keys() and all(torch.equal(state[k], other_state[k]) for k in state)


def test_an_attention_head_dim_that_does_not_divide_the_channels_gives_unet2dmodels_network():
    reference, ours = model_pair(DIFFUSERS_TEST_CONFIG, seed=20)
    attention = ours.down_blocks[1].attentions[0]
    assert (attention.heads, attention.head_dim, attention.to_q.out_features) == (2, 3, 6)  # 8 // 3 heads of 3
    sample = sample_for(DIFFUSERS_TEST_CONFIG, batch_size=2)
    with torch.no_grad():
        expected = reference(sample, torch.tensor([3, 700])).sample
        assert_outputs_equal(ours(sample, torch.tensor([3, 700])).sample, expected)
        ours.reference_mode = True
        assert torch.equal(ours(sample, torch.tensor([3, 700])).sample, expected)


def test_an_attention_head_dim_wider_than_an_attention_block_is_refused():
    config = dict(CONFIGS["project_cpu"], attention_head_dim=17)  # the attention level has 16 channels
    with pytest.raises(ValueError, match=r"attention_head_dim=17 is not supported; supported: None \(one head\) or "
                                         r"at most the 16 channels of the narrowest attention block$"):
        UNet(**config)
    with pytest.raises(ValueError, match="no head fits"):
        AttentionBlock(4, head_dim=5, norm_groups=None, eps=1e-5)


@pytest.mark.parametrize("name", ["ddpm_cifar10", "scale_shift", "single_level_no_mid_block"])
def test_the_same_seed_builds_unet2dmodels_initial_weights_in_its_order(name):
    torch.manual_seed(123)
    reference = UNet2DModel(**CONFIGS[name])
    torch.manual_seed(123)
    ours = UNet(**CONFIGS[name])
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert same_tensors(ours, reference)


def test_save_with_a_variant_loads_only_with_that_variant_in_both_classes(tmp_path):
    reference, ours = model_pair(CONFIGS["scale_shift"], seed=21)
    ours.save_pretrained(tmp_path, variant="fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    assert same_tensors(UNet.from_pretrained(tmp_path, variant="fp16"), reference)
    assert same_tensors(UNet2DModel.from_pretrained(tmp_path, variant="fp16"), reference)
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.bin"):
        UNet.from_pretrained(tmp_path)


def test_a_sharded_save_round_trips_and_loads_in_unet2dmodel(tmp_path):
    reference, ours = model_pair(CONFIGS["project_cpu"], seed=22)
    ours.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for loaded in (UNet.from_pretrained(tmp_path), UNet2DModel.from_pretrained(tmp_path)):
        assert same_tensors(loaded, reference)


def test_a_sharded_save_missing_a_tensor_is_refused_naming_it(tmp_path):
    _, ours = model_pair(CONFIGS["project_cpu"], seed=22)
    ours.save_pretrained(tmp_path, max_shard_size="20KB")
    index_path = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["conv_out.bias"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"the saved weights do not fit UNet: missing: conv_out\.bias$"):
        UNet.from_pretrained(tmp_path)


def test_a_pickle_save_loads_through_diffusers_weights_only_loader(tmp_path):
    reference, ours = model_pair(CONFIGS["ddpm_cifar10"], seed=23)
    ours.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    assert same_tensors(UNet.from_pretrained(tmp_path), reference)
    # A pickle that holds more than tensors is refused unread: weights_only=True allows no other objects.
    not_only_tensors = {**ours.state_dict(), "extra": argparse.Namespace(code="anything")}
    torch.save(not_only_tensors, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="Unable to load weights"):
        UNet.from_pretrained(tmp_path)
    # Told to read safetensors only, the pickle is not read at all.
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
        UNet.from_pretrained(tmp_path, use_safetensors=True)


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
@pytest.mark.parametrize("keyword", ["torch_dtype", "dtype"])
def test_from_pretrained_takes_diffusers_dtype_keywords_and_low_cpu_mem_usage(tmp_path, keyword, low_cpu_mem_usage):
    reference, ours = model_pair(CONFIGS["project_cpu"], seed=24)
    ours.save_pretrained(tmp_path)
    loaded = UNet.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage, **{keyword: torch.bfloat16})
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert same_tensors(loaded, reference.to(torch.bfloat16))


def test_our_saved_unet_loads_in_a_ddpm_pipeline_with_no_warnings(tmp_path, caplog):
    reference, ours = model_pair(CONFIGS["project_cpu"], seed=25)
    DDPMPipeline(unet=reference, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    ours.save_pretrained(tmp_path / "unet")  # replaces the library's unet folder with ours
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    with caplog.at_level(logging.WARNING):
        pipeline = DDPMPipeline.from_pretrained(tmp_path)
    assert caplog.records == []
    assert isinstance(pipeline.unet, UNet2DModel) and same_tensors(pipeline.unet, reference)


def test_config_keys_read_as_attributes_warn_as_in_diffusers():
    ours = UNet(**CONFIGS["project_cpu"])
    with pytest.warns(FutureWarning, match="Accessing config attribute `in_channels` directly"):
        assert ours.in_channels == 1
    assert ours.config.in_channels == 1


def unet_config_of(config_file):
    """Get the U-Net section of a training config in configs/."""
    with open(os.path.join(REPOSITORY, "configs", config_file)) as file:
        return yaml.safe_load(file)["unet"]


@pytest.mark.parametrize("config", ["project_cpu", "dropout", "cpu.yaml", "fashion_mnist.yaml"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(config):
    config = unet_config_of(config) if config.endswith(".yaml") else CONFIGS[config]
    plain = randomize_(UNet(**config), seed=26).train()
    checkpointed = UNet(**config).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert not checkpointed.is_gradient_checkpointing
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing
    flagged = {type(module).__name__ for module in checkpointed.modules() if hasattr(module, "gradient_checkpointing")}
    assert flagged == {*config["down_block_types"], *config["up_block_types"], "UNetMidBlock2D"}

    sample = sample_for(config, batch_size=2, seed=27)
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(8)  # the same dropout masks: checkpointing replays the random state in its recompute
        loss = (model(sample, torch.tensor([10, 900])).sample ** 2).mean()
        loss.backward()
        losses.append(loss.detach())
    # The recompute runs the same kernels on the same inputs, so the results are the same to the bit.
    assert torch.equal(losses[0], losses[1])
    grads = dict(plain.named_parameters())
    for name, param in checkpointed.named_parameters():
        assert torch.equal(param.grad, grads[name].grad), name

    checkpointed.disable_gradient_checkpointing()
    assert not checkpointed.is_gradient_checkpointing


def test_gradient_checkpointing_matches_unet2dmodels_checkpointed_gradients():
    config = CONFIGS["project_cpu"]
    reference, ours = model_pair(config, seed=28)
    sample = sample_for(config, seed=29)
    outputs = {}
    for key, model in (("reference", reference), ("ours", ours)):
        model.train().enable_gradient_checkpointing()
        output = model(sample, torch.tensor([4, 300, 800])).sample
        (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
        outputs[key] = output.detach()
    assert relative_error(outputs["ours"], outputs["reference"]) <= 1e-5
    reference_grads = dict(reference.named_parameters())
    total = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm()
    for name, param in ours.named_parameters():
        expected = reference_grads[name].grad
        assert (param.grad - expected).norm() <= 1e-4 * max(expected.norm(), 1e-3 * total), name


def test_gradient_checkpointing_changes_nothing_without_autograd():
    config = CONFIGS["project_cpu"]
    _, ours = model_pair(config, seed=30)
    sample = sample_for(config)
    with torch.no_grad():
        expected = ours(sample, 50).sample
        ours.enable_gradient_checkpointing()
        assert torch.equal(ours(sample, 50).sample, expected)


def test_saved_config_is_unet2dmodels_and_round_trips(tmp_path):
    ours = UNet(**CONFIGS["odd_widths_no_mid_attention"])
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "UNet2DModel"
    assert as_json(UNet.from_pretrained(tmp_path).config) == as_json(ours.config)
