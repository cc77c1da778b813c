"""Our UNet against diffusers.UNet2DModel: the same parameters, the same outputs and gradients, interchangeable files,
and clear errors for what we do not implement.

Every comparison uses random weights, norm scales and shifts included (a freshly built model has GroupNorm weight 1
and bias 0, which would hide a swapped or skipped affine transform). "Equal" means a relative error of at most 1e-5
for outputs and 1e-4 for gradients in float32 (the two implementations add the same numbers in different orders).
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import load_benchmark
from ddpm_fashion.models.unet import WEIGHTS_NAME, UNet, load_strict
from ddpm_fashion.models.unet_blocks import AttentionBlock, ResnetBlock, Upsample

OUTPUT_RTOL = 1e-5
GRAD_RTOL = 1e-4

# Small networks that together use every supported option with a non-default value at least once.
CONFIGS = {
    # The original DDPM (CIFAR10) network's options, as in google/ddpm-cifar10-32.
    "ddpm_cifar10": dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, downsample_padding=0, attention_head_dim=None,
        norm_num_groups=4),
    # The architecture configs/cpu.yaml trains, narrower.
    "project_cpu": dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4),
    # Scale-and-shift time conditioning; the bottleneck attention then has no GroupNorm.
    "scale_shift": dict(
        sample_size=8, in_channels=2, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        resnet_time_scale_shift="scale_shift", mid_block_scale_factor=1.414, center_input_sample=True,
        attention_head_dim=4, norm_num_groups=2, act_fn="silu"),
    # Scale-and-shift with the bottleneck attention's own GroupNorm size, on a non-square sample.
    "scale_shift_attn_groups": dict(
        sample_size=(8, 16), in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4, norm_num_groups=8),
    # Dropout, a non-default time embedding width, diffusers' other name for SiLU. No attention anywhere: after an
    # attention block UNet2DModel's activations are channels-last and it draws its dropout masks in that order, so
    # only attention-free networks draw the same masks as ours (which always draws in NCHW order).
    "dropout": dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False, norm_num_groups=4, time_embedding_dim=20, dropout=0.2, num_train_timesteps=1000,
        act_fn="swish"),
    # No bottleneck attention; odd widths (an odd sinusoidal embedding is zero-padded) and 3-channel heads.
    "odd_widths_no_mid_attention": dict(
        sample_size=8, in_channels=1, out_channels=2, block_out_channels=(9, 18), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        add_attention=False, attention_head_dim=3, norm_num_groups=3, norm_eps=1e-4),
    # One level (no down/upsampler), no bottleneck at all.
    "single_level_no_mid_block": dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=2,
        down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",), mid_block_type=None,
        norm_num_groups=4),
}


def randomize_(model, seed):
    """Give every parameter random values of a sensible scale, norm weights and biases included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.3 * noise)
            elif param.ndim == 1:
                param.copy_(0.2 * noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)
    return model


def model_pair(config, seed=0):
    """Get a random UNet2DModel and our UNet holding the same weights, loaded by name (no conversion code)."""
    reference = randomize_(UNet2DModel(**config), seed).eval()
    ours = UNet(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def sample_for(config, batch_size=3, seed=1):
    """Get a random input batch the config's networks accept."""
    size = config["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, config["in_channels"], height, width, generator=generator)


def relative_error(actual, expected):
    """Get max |actual - expected| relative to max |expected|."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def as_json(config):
    """Get the public config keys as config.json stores them (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def assert_outputs_equal(actual, expected):
    """Outputs agree to float32 rounding."""
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= OUTPUT_RTOL


TIMESTEP_FORMS = {
    "int": lambda n: 417,
    "float": lambda n: 417.8,  # truncated to 417 by both
    "tensor_0d": lambda n: torch.tensor(250),
    "tensor_1d_one": lambda n: torch.tensor([999]),
    "tensor_1d_per_sample": lambda n: torch.tensor([0, 500, 999, 31, 7][:n]),
    "float_tensor_per_sample": lambda n: torch.tensor([0.5, 500.25, 998.0, 3.0, 1.0][:n]),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_equals_diffusers_for_every_timestep_form(name):
    config = CONFIGS[name]
    reference, ours = model_pair(config)
    sample = sample_for(config)
    with torch.no_grad():
        for form, make_timestep in TIMESTEP_FORMS.items():
            expected = reference(sample, make_timestep(len(sample))).sample
            actual = ours(sample, make_timestep(len(sample))).sample
            assert relative_error(actual, expected) <= OUTPUT_RTOL, form
        # return_dict=False gives a tuple, as diffusers does.
        (as_tuple,) = ours(sample, 3, return_dict=False)
        assert_outputs_equal(as_tuple, reference(sample, 3).sample)


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_gradients_equal_diffusers(name):
    config = CONFIGS[name]
    reference, ours = model_pair(config, seed=2)
    reference.train()
    ours.train()
    sample = sample_for(config, seed=3)
    timesteps = torch.tensor([3, 600, 999])
    weights = torch.randn(sample.shape[0], config["out_channels"], *sample.shape[2:])
    outputs = {}
    for key, model in (("reference", reference), ("ours", ours)):
        torch.manual_seed(7)  # the same dropout masks for both
        output = model(sample, timesteps).sample
        (output * weights).sum().backward()
        outputs[key] = output.detach()
    assert_outputs_equal(outputs["ours"], outputs["reference"])

    reference_grads = {n: p.grad for n, p in reference.named_parameters()}
    total = torch.cat([g.flatten() for g in reference_grads.values()]).norm()
    for param_name, param in ours.named_parameters():
        expected = reference_grads[param_name]
        # Some gradients are zero in exact arithmetic and hold only rounding noise (a key bias shifts all logits of
        # a query equally; a conv bias before a one-channel-per-group GroupNorm is normalised away), so a tensor's
        # error is measured against at least 1e-3 of the whole gradient.
        bound = GRAD_RTOL * max(expected.norm().item(), 1e-3 * total.item())
        assert (param.grad - expected).norm().item() <= bound, param_name


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_names_shapes_and_counts_equal_diffusers(name):
    reference, ours = UNet2DModel(**CONFIGS[name]), UNet(**CONFIGS[name])
    reference_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == reference_shapes
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_configurations_equal_diffusers(data):
    levels = data.draw(st.integers(1, 3), label="levels")
    groups = data.draw(st.sampled_from([1, 2, 4]), label="norm_num_groups")
    channels = tuple(groups * data.draw(st.integers(1, 3)) * 4 for _ in range(levels))
    head_dim = data.draw(st.sampled_from([None, 1, 2]), label="attention_head_dim")
    config = dict(
        sample_size=2 ** (levels - 1) * data.draw(st.integers(1, 3)),
        in_channels=data.draw(st.integers(1, 3)),
        out_channels=data.draw(st.integers(1, 3)),
        center_input_sample=data.draw(st.booleans()),
        flip_sin_to_cos=data.draw(st.booleans()),
        freq_shift=data.draw(st.sampled_from([0, 1])),
        down_block_types=tuple(data.draw(st.sampled_from(["DownBlock2D", "AttnDownBlock2D"])) for _ in channels),
        up_block_types=tuple(data.draw(st.sampled_from(["UpBlock2D", "AttnUpBlock2D"])) for _ in channels),
        block_out_channels=channels,
        layers_per_block=data.draw(st.integers(1, 2)),
        mid_block_scale_factor=data.draw(st.sampled_from([1, 0.7])),
        downsample_padding=data.draw(st.sampled_from([0, 1])),
        attention_head_dim=head_dim,
        norm_num_groups=groups,
        norm_eps=data.draw(st.sampled_from([1e-5, 1e-6])),
        resnet_time_scale_shift=data.draw(st.sampled_from(["default", "scale_shift"])),
        add_attention=data.draw(st.booleans()),
    )
    reference, ours = model_pair(config, seed=data.draw(st.integers(0, 1000)))
    sample = sample_for(config, batch_size=2)
    with torch.no_grad():
        timesteps = torch.tensor([5, 900])
        assert_outputs_equal(ours(sample, timesteps).sample, reference(sample, timesteps).sample)


def test_upsampler_equals_nearest_upsampling_then_convolution():
    upsample = randomize_(Upsample(6), seed=4)
    x = torch.randn(2, 6, 5, 7)
    expected = upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert_outputs_equal(upsample(x), expected)


def test_input_memory_layout_does_not_change_the_output_and_output_is_nchw():
    config = CONFIGS["project_cpu"]
    reference, ours = model_pair(config)
    sample = sample_for(config)
    with torch.no_grad():
        plain = ours(sample, 10).sample
        channels_last = ours(sample.contiguous(memory_format=torch.channels_last), 10).sample
        strided = ours(sample.transpose(2, 3).contiguous().transpose(2, 3), 10).sample
    assert plain.is_contiguous() and channels_last.is_contiguous()
    assert torch.equal(channels_last, plain) and torch.equal(strided, plain)


@pytest.mark.parametrize("name", CONFIGS)
def test_reference_mode_is_bitwise_unet2dmodel(name):
    config = CONFIGS[name]
    reference, ours = model_pair(config)
    ours.reference_mode = True
    switched = [module for module in ours.modules() if isinstance(module, (ResnetBlock, AttentionBlock, Upsample))]
    assert all(module.reference_mode for module in switched)
    with torch.no_grad():
        for batch_size, timesteps in ((2, (0, 417, 999)), (64, (417,))):  # from 64 on, diffusers' upsampler
            sample = sample_for(config, batch_size=batch_size)             # switches layout
            for timestep in timesteps:
                expected = reference(sample, timestep).sample
                assert torch.equal(ours(sample, timestep).sample, expected), (batch_size, timestep)
    ours.reference_mode = False
    assert not any(module.reference_mode for module in switched)


def test_conversion_round_trip_is_exact_and_carries_dtype_and_mode():
    config = CONFIGS["ddpm_cifar10"]
    reference = randomize_(UNet2DModel(**config), seed=5).train()
    ours = UNet.from_diffusers(reference)
    assert ours.training and ours.dtype == torch.float32 and ours.device.type == "cpu"
    back = ours.eval().to_diffusers()
    assert isinstance(back, UNet2DModel) and not back.training
    again = UNet.from_diffusers(back)
    for model in (back, again):
        assert model.state_dict().keys() == reference.state_dict().keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.state_dict().items())
    assert as_json(again.config) == as_json(ours.config)

    half = UNet.from_diffusers(reference.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.to_diffusers().dtype == torch.bfloat16


def test_config_has_attribute_access_and_diffusers_keys():
    ours = UNet(**CONFIGS["project_cpu"])
    assert ours.config.in_channels == 1 and ours.config.sample_size == 16
    assert ours.config.block_out_channels == (8, 16, 32)
    public = {k for k in ours.config if not k.startswith("_")}
    assert public == {k for k in UNet2DModel(**CONFIGS["project_cpu"]).config if not k.startswith("_")}


def test_save_pretrained_is_read_by_diffusers_with_no_missing_or_unexpected_keys(tmp_path):
    config = CONFIGS["scale_shift"]
    reference, ours = model_pair(config, seed=6)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS_NAME]
    loaded, info = UNet2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.state_dict().items())
    sample = sample_for(config)
    with torch.no_grad():
        assert_outputs_equal(loaded(sample, 9).sample, reference(sample, 9).sample)


def test_from_pretrained_reads_a_diffusers_unet_and_pipeline_folder(tmp_path):
    config = CONFIGS["ddpm_cifar10"]
    reference, _ = model_pair(config, seed=8)
    reference.save_pretrained(tmp_path / "unet_only")
    DDPMPipeline(unet=reference, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipeline")
    sample = sample_for(config)
    for loaded in (UNet.from_pretrained(tmp_path / "unet_only"),
                   UNet.from_pretrained(tmp_path / "pipeline", subfolder="unet")):
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.state_dict().items())
        with torch.no_grad():
            assert_outputs_equal(loaded(sample, 77).sample, reference(sample, 77).sample)


def test_save_then_from_pretrained_keeps_weights_config_and_dtype(tmp_path):
    ours = randomize_(UNet(**CONFIGS["odd_widths_no_mid_attention"]), seed=9).to(torch.bfloat16)
    ours.save_pretrained(tmp_path)
    loaded = UNet.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert as_json(loaded.config) == as_json(ours.config)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert UNet.from_pretrained(tmp_path, torch_dtype=torch.float32).dtype == torch.float32


@pytest.fixture
def saved_unet(tmp_path):
    """A saved small UNet folder and its tensors."""
    ours = UNet(**CONFIGS["project_cpu"])
    ours.save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / WEIGHTS_NAME)


def test_from_pretrained_rejects_missing_tensors_naming_them(saved_unet):
    folder, tensors = saved_unet
    del tensors["conv_in.weight"], tensors["mid_block.attentions.0.to_q.bias"]
    save_file(tensors, folder / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"missing: conv_in\.weight, mid_block\.attentions\.0\.to_q\.bias$"):
        UNet.from_pretrained(folder)


def test_from_pretrained_rejects_unexpected_and_wrongly_shaped_tensors_naming_them(saved_unet):
    folder, tensors = saved_unet
    tensors["class_embedding.weight"] = torch.zeros(10, 32)
    tensors["conv_out.bias"] = torch.zeros(2)
    save_file(tensors, folder / WEIGHTS_NAME)
    with pytest.raises(ValueError) as error:
        UNet.from_pretrained(folder)
    message = str(error.value)
    assert "\n" not in message
    assert "unexpected: class_embedding.weight" in message
    assert "wrong shape: conv_out.bias (2,) != (1,)" in message


def test_load_strict_rejects_what_diffusers_would_only_warn_about():
    ours = UNet(**CONFIGS["project_cpu"])
    state = ours.state_dict()
    state.pop("conv_norm_out.weight")
    with pytest.raises(ValueError, match=r"^state dict does not fit UNet: missing: conv_norm_out\.weight$"):
        load_strict(ours, state)
    with pytest.raises(ValueError, match="unexpected: extra"):
        load_strict(ours, {**ours.state_dict(), "extra": torch.zeros(1)})


def test_from_diffusers_rejects_a_model_with_options_we_do_not_implement():
    config = dict(CONFIGS["project_cpu"], class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        UNet.from_diffusers(UNet2DModel(**config))


def test_from_pretrained_file_errors(tmp_path, saved_unet):
    with pytest.raises(FileNotFoundError, match="no such U-Net directory"):
        UNet.from_pretrained(tmp_path / "absent")
    folder, _ = saved_unet
    (folder / WEIGHTS_NAME).unlink()
    # With no weights file at all, diffusers' loader names the ones it looked for (pickles are read only through
    # its weights_only loader: test_unet_modelmixin.py).
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.bin"):
        UNet.from_pretrained(folder)
    pipeline = tmp_path / "pipeline"
    (pipeline / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="subfolder='unet'"):
        UNet.from_pretrained(pipeline)


def test_from_pretrained_rejects_a_config_of_another_model(saved_unet):
    folder, _ = saved_unet
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        UNet.from_pretrained(folder)


def test_from_pretrained_rejects_config_keys_unet2dmodel_does_not_take(saved_unet):
    folder, _ = saved_unet
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 64}))
    with pytest.raises(ValueError, match="keys UNet2DModel does not take: cross_attention_dim$"):
        UNet.from_pretrained(folder)


BASE = CONFIGS["project_cpu"]
# (key, value, what the one-line message must quote): the key, the offending value, then what is supported.
UNSUPPORTED = [
    ("time_embedding_type", "fourier", "time_embedding_type='fourier' is not supported; supported: positional"),
    ("class_embed_type", "timestep", "class_embed_type='timestep' is not supported; supported: None"),
    ("num_class_embeds", 10, "num_class_embeds=10 is not supported; supported: None"),
    ("mid_block_type", "UNetMidBlock2DCrossAttn", "mid_block_type='UNetMidBlock2DCrossAttn' is not supported; "
                                                  "supported: UNetMidBlock2D, None"),
    ("downsample_type", "resnet", "downsample_type='resnet' is not supported; supported: conv"),
    ("upsample_type", "resnet", "upsample_type='resnet' is not supported; supported: conv"),
    ("act_fn", "gelu", "act_fn='gelu' is not supported; supported: silu, swish"),
    ("resnet_time_scale_shift", "spatial", "resnet_time_scale_shift='spatial' is not supported; "
                                           "supported: default, scale_shift"),
    ("downsample_padding", 2, "downsample_padding=2 is not supported; supported: 0, 1"),
    ("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
     "down_block_types[1]='CrossAttnDownBlock2D' is not supported; supported: DownBlock2D, AttnDownBlock2D"),
    ("up_block_types", ("UpBlock2D", "AttnUpBlock2D", "SkipUpBlock2D"),
     "up_block_types[2]='SkipUpBlock2D' is not supported; supported: UpBlock2D, AttnUpBlock2D"),
    ("sample_size", 18, "sample_size=18 is not supported; supported: None, or an int or (height, width) of "
                        "positive multiples of 2**(levels-1) = 4"),
    ("sample_size", (16, 6), "sample_size=(16, 6) is not supported"),
    ("norm_num_groups", 3, "norm_num_groups=3 is not supported; supported: an int dividing every "
                           "block_out_channels (8, 16, 32)"),
    ("attn_norm_num_groups", 5, "attn_norm_num_groups=5 is not supported; supported: None or an int dividing 32"),
    ("attention_head_dim", 0, "attention_head_dim=0 is not supported"),
    ("dropout", 1.0, "dropout=1.0 is not supported; supported: a probability in [0, 1)"),
    ("block_out_channels", (8, 16), "block_out_channels=(8, 16) has 2 levels but down_block_types has 3"),
    ("freq_shift", 1, "freq_shift=1 is not supported; supported: any value but block_out_channels[0] // 2 = 1"),
]


@pytest.mark.parametrize("key,value,message", UNSUPPORTED, ids=[f"{k}={v}" for k, v, _ in UNSUPPORTED])
def test_unsupported_config_raises_naming_key_value_and_what_is_supported(key, value, message):
    config = dict(BASE, **{key: value})
    if key == "freq_shift":
        config["block_out_channels"] = (2, 4, 8)  # a 2-wide sinusoid with shift 1 divides by zero (NaN in diffusers)
        config["norm_num_groups"] = 2
    with pytest.raises(ValueError) as error:
        UNet(**config)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("sample,timestep,message", [
    (torch.randn(2, 3, 16, 16), 1, r"sample must be a tensor \(N, 1, H, W\), got \(2, 3, 16, 16\)"),
    (torch.randn(1, 16, 16), 1, r"got \(1, 16, 16\)"),
    (torch.randn(2, 1, 16, 10), 1, "multiples of 4"),
    (torch.randn(2, 1, 16, 16), torch.tensor([1, 2, 3]), "length 1 or 2"),
    (torch.randn(2, 1, 16, 16), torch.ones(2, 1), "0-d or 1-d"),
    (torch.randn(2, 1, 16, 16), "5", "number or a tensor"),
])
def test_bad_forward_input_raises_one_line_value_error(sample, timestep, message):
    ours = UNet(**BASE)
    with pytest.raises(ValueError, match=message):
        ours(sample, timestep)


def test_class_labels_are_rejected_like_diffusers():
    with pytest.raises(ValueError, match="no class embedding"):
        UNet(**BASE)(torch.randn(1, 1, 16, 16), 1, class_labels=torch.tensor([0]))


def test_bf16_autocast_forward_runs_and_stays_close():
    config = CONFIGS["project_cpu"]
    reference, ours = model_pair(config, seed=10)
    sample = sample_for(config)
    with torch.no_grad():
        exact = ours(sample, 300).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours_bf16 = ours(sample, 300).sample
            reference_bf16 = reference(sample, 300).sample
    assert torch.isfinite(ours_bf16).all()
    # bf16 keeps 8 bits of mantissa: about 1% off fp32 here, for diffusers' model as for ours.
    assert ours_bf16.dtype == reference_bf16.dtype == torch.bfloat16
    assert relative_error(ours_bf16.float(), exact) < 0.03
    assert relative_error(reference_bf16.float(), exact) < 0.03


def test_ddpm_pipeline_runs_with_our_unet_and_matches_diffusers_unet():
    config = CONFIGS["project_cpu"]
    reference, ours = model_pair(config, seed=11)
    images = {}
    for key, unet in (("reference", reference), ("ours", ours)):
        pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
        pipeline.set_progress_bar_config(disable=True)
        result = pipeline(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                          output_type="np")
        images[key] = torch.from_numpy(result.images)
    assert images["ours"].shape == (2, 16, 16, 1)
    assert (images["ours"] - images["reference"]).abs().max() < 1e-4


def test_speed_benchmark_runs_and_checks_identical_results(capsys):
    import argparse

    benchmark = load_benchmark("unet_speed")
    args = argparse.Namespace(rounds=1, batch_size=2, precision="fp32", compile=False, skip_memory=True)
    benchmark.report("tiny", CONFIGS["project_cpu"], args, torch.device("cpu"))
    printed = capsys.readouterr().out
    differences = [float(x) for x in re.findall(r"rel\. diff ([0-9.e+-]+)", printed)]
    assert len(differences) == 2 and max(differences) < 1e-5
    assert printed.count("x\n") == 8  # three training rows and one inference row, wall clock and CPU time


def test_drift_benchmark_shows_reference_mode_at_zero(tmp_path, capsys, monkeypatch):
    import sys

    reference, _ = model_pair(CONFIGS["project_cpu"])
    reference.save_pretrained(tmp_path / "unet")  # the benchmark reads a pipeline folder's unet/
    benchmark = load_benchmark("unet_drift")
    monkeypatch.setattr(sys, "argv", ["unet_drift.py", "--model", str(tmp_path), "--batch_size", "2"])
    benchmark.main()
    rows = {line.split("[")[0].strip(): [float(x) for x in line.split("[")[1].rstrip("]").split(",")]
            for line in capsys.readouterr().out.splitlines() if "[" in line}
    assert rows["ours, reference_mode=True"] == [0.0, 0.0, 0.0]
    assert 0 < max(rows["ours (fused upsampler)"]) < 1e-4  # the fast layout rounds differently, by little
    assert len(rows) == 4


def test_cpu_autocast_keeps_attention_in_float32(monkeypatch):
    # The CPU flash-attention kernel is several times slower in bf16 (ddpm_fashion/unet_blocks.attention); the
    # convolutions around it still run in bf16.
    config = CONFIGS["project_cpu"]
    _, ours = model_pair(config, seed=12)
    seen = []
    real_attention = torch.nn.functional.scaled_dot_product_attention

    def recording_attention(q, k, v, **kwargs):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real_attention(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_attention)
    sample = sample_for(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(sample, 300).sample
    assert seen and set(seen) == {(torch.float32, False)}
    assert out.dtype == torch.bfloat16  # the last convolution ran in bf16
    seen.clear()
    ours(sample, 300)  # without autocast nothing changes
    assert set(seen) == {(torch.float32, False)}
    seen.clear()
    ours.to(torch.bfloat16)(sample.to(torch.bfloat16), 300)  # bf16 weights, no autocast: bf16 throughout
    assert set(seen) == {(torch.bfloat16, False)}
