"""The flags of diffusers' train_unconditional.py that are not about data: --push_to_hub and the hub_* options,
--model_config_name_or_path, --save_model_epochs, --logger/--logging_dir, --gradient_checkpointing,
--enable_xformers_memory_efficient_attention, --local_rank (docs/training.md has the table of every flag).

The Hub is never reached: the push runs huggingface_hub's own HfApi.upload_folder (its file selection, ignore
patterns and commit operations) with only the network calls replaced by records (FakeHub).
"""

import json
import sys
import types
from pathlib import Path

import pytest
from huggingface_hub import HfApi, RepoUrl, constants
from safetensors.torch import load_file

from conftest import ROOT, SMOKE, write_synthetic_fashion_mnist
from ddpm_fashion.training import hub, run_options, trackers
from ddpm_fashion.training.config import field_type, parse_config

sys.path.insert(0, str(ROOT))
import train_accelerate  # noqa: E402

TOKEN = "hf_TestTokenThatMustNeverBeWritten"
SMOKE_UNET = {"sample_size": 32, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32],
              "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "attention_head_dim": 8}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """64 synthetic training images: 4 steps of 16 make an epoch, so epoch ends come within a few steps."""
    return write_synthetic_fashion_mnist(tmp_path_factory.mktemp("tiny-fashion"), num_train=64, num_test=16)


def trainer_args(output_dir, data_dir, *extra):
    return ["--config", str(SMOKE), "--output_dir", str(output_dir), "--data_dir", str(data_dir),
            "--save_images_steps", "100", "--eval_batch_size", "2", *map(str, extra)]


def refusal(capsys, argv):
    """Run main(argv), which must refuse: exit code 2 and one stderr line; get that line."""
    assert train_accelerate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_accelerate.py: error: "), err
    return err[0]


class FakeHub(HfApi):
    """HfApi whose network calls are records; upload_folder itself (file listing, allow/ignore patterns, the commit
    operations) is huggingface_hub's code."""

    calls: list = []
    existing_public: set = set()

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, token, private, exist_ok))
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def repo_info(self, repo_id, *, token=None, **kwargs):
        return types.SimpleNamespace(private=repo_id not in self.existing_public)

    def _validate_yaml(self, content, *, repo_type=None, token=None):  # a POST to the Hub
        self.calls.append(("validate_yaml", content))

    def create_commit(self, repo_id, operations, *, commit_message, token=None, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.calls.append(("create_commit", repo_id, commit_message, token, files))
        return types.SimpleNamespace(oid="0" * 40)


@pytest.fixture
def fake_hub(monkeypatch):
    """The Hub reachable as far as the trainer can tell: online, and HfApi replaced by FakeHub."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)  # the single-commit path
    monkeypatch.setattr(hub, "HfApi", FakeHub)
    monkeypatch.setattr(hub, "get_token", lambda: None)  # no stored login: the token is --hub_token's
    FakeHub.calls, FakeHub.existing_public = [], set()
    return FakeHub


def commits():
    return [call for call in FakeHub.calls if call[0] == "create_commit"]


# ---------------------------------------------------------------------------------------------------------------
# --push_to_hub: refused before anything is read or written, without network or token
# ---------------------------------------------------------------------------------------------------------------

def test_push_to_hub_offline_is_refused_before_anything_is_written(tmp_path, tiny_data, capsys):
    assert constants.is_offline_mode()  # conftest sets HF_HUB_OFFLINE=1
    line = refusal(capsys, trainer_args(tmp_path / "out", tiny_data, "--push_to_hub"))
    assert "HF_HUB_OFFLINE is set" in line
    assert not (tmp_path / "out").exists()


def test_push_to_hub_without_a_token_is_refused_before_anything_is_written(tmp_path, tiny_data, capsys, fake_hub):
    line = refusal(capsys, trainer_args(tmp_path / "out", tiny_data, "--push_to_hub"))
    assert "needs a Hugging Face token" in line and "hf auth login" in line
    assert not (tmp_path / "out").exists() and FakeHub.calls == []


def test_an_unreachable_hub_is_refused_before_output_dir_is_written(tmp_path, tiny_data, capsys, fake_hub,
                                                                     monkeypatch):
    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(FakeHub, "create_repo", no_network)
    line = refusal(capsys, trainer_args(tmp_path / "out", tiny_data, "--push_to_hub", "--hub_token", TOKEN))
    assert "cannot create or reach the Hub repo out" in line and "name resolution" in line
    assert TOKEN not in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--hub_model_id", "me/model"], "--hub_model_id is only used with --push_to_hub"),
    (["--hub_token", TOKEN], "--hub_token is only used with --push_to_hub"),
    (["--hub_private_repo"], "--hub_private_repo is only used with --push_to_hub"),
    (["--push_to_hub", "--hub_token", TOKEN, "--hub_model_id", "a/b/c"], "is not a valid Hub repo id"),
    (["--push_to_hub", "--hub_token", TOKEN, "--logger", "mlflow"], "could expose the token"),
])
def test_hub_options_that_cannot_work_are_refused(tmp_path, tiny_data, capsys, fake_hub, monkeypatch, extra,
                                                  message):
    monkeypatch.setitem(trackers.TRACKERS, "mlflow", (lambda: True, "mlflow"))  # as if installed
    line = refusal(capsys, trainer_args(tmp_path / "out", tiny_data, *extra))
    assert message in line and TOKEN not in line
    assert not (tmp_path / "out").exists()


def test_repo_id_token_and_visibility_resolve_as_the_example(monkeypatch, fake_hub):
    target = hub.resolve_target("runs/ddpm-ema-64/", None, TOKEN, False, "tensorboard")
    assert (target.repo_id, target.token, target.private) == ("ddpm-ema-64", TOKEN, None)  # output_dir's name
    assert TOKEN not in repr(target)
    target = hub.resolve_target("out", "org/model", TOKEN, True, "none")
    assert (target.repo_id, target.private) == ("org/model", True)
    monkeypatch.setattr(hub, "get_token", lambda: "hf_fromLogin")  # HF_TOKEN or `hf auth login`
    assert hub.resolve_target("out", None, None, False, "wandb").token == "hf_fromLogin"
    assert hub.resolve_target("out", None, TOKEN, False, "none").token == TOKEN  # --hub_token wins

    created = hub.create_repo(FakeHub(), target)
    assert created.repo_id == "org/model"
    assert FakeHub.calls == [("create_repo", "org/model", TOKEN, True, True)]
    FakeHub.existing_public = {"org/model"}
    with pytest.raises(ValueError, match="exists and is public"):
        hub.create_repo(FakeHub(), target)
    assert hub.create_repo(FakeHub(), hub.HubTarget("model", TOKEN)).repo_id == "me/model"  # the user's namespace


def test_upload_sends_the_published_files_only(tmp_path, fake_hub):
    folder = tmp_path / "out"
    for name in ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "samples.png", "loss.png", "train_config.yaml",
                 "checkpoints/checkpoint-4/model.safetensors", "checkpoints/checkpoint-4/optimizer.bin",
                 "logs/ddpm_fashion/events.out.tfevents.1", ".lock", "ddpm_fashion_run.json", "my-notes.txt",
                 "step_3/x.bin", "epoch_2/x.bin", ".git/config", ".ddpm_fashion-staging-1-pipeline/model_index.json"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    card = f'---\nlibrary_name: diffusers\n---\n\npipe = DDPMPipeline.from_pretrained("{folder}")\n'
    (folder / "README.md").write_text(card)
    published = ["README.md", "loss.png", "model_index.json", "samples.png", "scheduler/scheduler_config.json",
                 "train_config.yaml", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert hub.published_files(folder) == published
    before = set(folder.rglob("*"))
    hub.upload(FakeHub(), hub.HubTarget("me/out", TOKEN), folder, "Epoch 1")
    hub.upload(FakeHub(), hub.HubTarget("me/out", TOKEN), folder, "Epoch 2")  # upload_folder extends its list
    (_, repo_id, message, token, files), second = commits()
    assert (repo_id, message, token) == ("me/out", "Epoch 1", TOKEN) and second[4] == files
    assert sorted(files) == published  # what huggingface_hub's upload_folder put in the commit
    assert files["unet/diffusion_pytorch_model.safetensors"] == b"unet/diffusion_pytorch_model.safetensors"
    # the card as the Hub gets it: validated, loading from the repo; the local card is unchanged
    assert b'from_pretrained("me/out")' in files["README.md"] and b"library_name: diffusers" in files["README.md"]
    assert ("validate_yaml", files["README.md"].decode()) in FakeHub.calls
    assert (folder / "README.md").read_text() == card
    assert set(folder.rglob("*")) == before  # the staging folder is gone

    (folder / "README.md").write_text("---\nlibrary_name: [unclosed\n---\n")  # ModelCard refuses it locally
    with pytest.raises(hub.PushError, match="uploading to me/out failed.*the pipeline is saved in"):
        hub.upload(FakeHub(), hub.HubTarget("me/out", TOKEN), folder, "Epoch 3")
    assert len(commits()) == 2 and set(folder.rglob("*")) == before


def test_push_to_hub_end_to_end_with_save_model_epochs(tmp_path, tiny_data, fake_hub, capsys):
    """The whole run: the repo is created before output_dir, the pipeline is pushed after each --save_model_epochs
    epoch and at the end, and the token is in no file of output_dir."""
    out = tmp_path / "ddpm-ema-tiny"
    assert train_accelerate.main(trainer_args(out, tiny_data, "--max_train_steps", 6, "--checkpointing_steps", 6,
                                              "--save_model_epochs", 1, "--push_to_hub", "--hub_token", TOKEN,
                                              "--hub_private_repo", "--logger", "tensorboard")) == 0
    assert FakeHub.calls[0] == ("create_repo", "ddpm-ema-tiny", TOKEN, True, True)
    # 4 steps per epoch: epoch 1 ends at step 4, training at step 6
    assert [(c[1], c[2]) for c in commits()] == [("me/ddpm-ema-tiny", "Epoch 1"),
                                                 ("me/ddpm-ema-tiny", "End of training, step 6")]
    final = commits()[-1][4]
    assert "unet/diffusion_pytorch_model.safetensors" in final and not any("checkpoint" in p for p in final)
    assert final["unet/diffusion_pytorch_model.safetensors"] == \
        (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert b'from_pretrained("me/ddpm-ema-tiny")' in final["README.md"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # the token is in none of them either
    for path in out.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    assert "hub_token" not in (out / "train_config.yaml").read_text()
    assert TOKEN not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# --model_config_name_or_path
# ---------------------------------------------------------------------------------------------------------------

def dry_run_unet(argv):
    config, _, _ = parse_config(["--config", str(SMOKE), *argv])
    return config.unet


def test_model_config_from_a_file_a_model_folder_or_a_pipeline_folder(tmp_path):
    from diffusers import UNet2DModel

    model = UNet2DModel(**{**SMOKE_UNET, "layers_per_block": 2})
    model.save_config(tmp_path / "model")  # what UNet2DModel.save_pretrained writes beside the weights
    (tmp_path / "pipeline").mkdir()
    model.save_config(tmp_path / "pipeline" / "unet")
    for source in (tmp_path / "model", tmp_path / "model" / "config.json", tmp_path / "pipeline"):
        unet = dry_run_unet(["--model_config_name_or_path", str(source)])
        assert unet["layers_per_block"] == 2 and unet["block_out_channels"] == [16, 32]
        assert not any(key.startswith("_") for key in unet)
        public = [{k: v for k, v in json.loads(json.dumps(dict(c))).items() if not k.startswith("_")}
                  for c in (UNet2DModel.from_config(unet).config, model.config)]
        assert public[0] == public[1]
    # it replaces the config file's unet block; --unet.KEY still overrides one key
    unet = dry_run_unet(["--model_config_name_or_path", str(tmp_path / "model"), "--unet.layers_per_block", "1"])
    assert unet["layers_per_block"] == 1


def test_model_config_trains(tmp_path, tiny_data):
    from diffusers import UNet2DModel

    UNet2DModel(**SMOKE_UNET).save_config(tmp_path / "model")
    assert train_accelerate.main(trainer_args(tmp_path / "out", tiny_data, "--max_train_steps", 1,
                                              "--model_config_name_or_path", tmp_path / "model")) == 0
    saved = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert saved["block_out_channels"] == [16, 32] and saved["layers_per_block"] == 1


def test_bad_model_configs_are_refused_in_one_line(tmp_path, tiny_data, capsys):
    from diffusers import DDPMScheduler

    DDPMScheduler().save_config(tmp_path / "scheduler")
    (tmp_path / "scheduler" / "config.json").write_text((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    cases = [(tmp_path / "missing", "no UNet2DModel config could be read"),
             (tmp_path / "scheduler", "is a DDPMScheduler config, not a UNet2DModel one")]
    for source, message in cases:
        line = refusal(capsys, trainer_args(tmp_path / "out", tiny_data, "--model_config_name_or_path", source))
        assert message in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# --logger, --logging_dir
# ---------------------------------------------------------------------------------------------------------------

def test_logger_choices_are_accelerates_trackers():
    assert set(field_type("logger")[0].__args__) == set(trackers.TRACKERS) | {"none"}


@pytest.mark.parametrize("logger", sorted(set(trackers.TRACKERS) - {"tensorboard"}))
def test_a_tracker_without_its_package_is_refused_naming_it(tmp_path, tiny_data, capsys, logger):
    available, package = trackers.TRACKERS[logger]
    if available():
        pytest.skip(f"{package} is installed")
    line = refusal(capsys, trainer_args(tmp_path / "out", tiny_data, "--logger", logger))
    assert f"--logger {logger} needs the {package} package, which is not installed: pip install {package}" in line
    assert not (tmp_path / "out").exists()


def test_tensorboard_logs_go_to_logging_dir(tmp_path, tiny_data):
    out = tmp_path / "out"
    assert train_accelerate.main(trainer_args(out, tiny_data, "--max_train_steps", 2, "--logger", "tensorboard",
                                              "--logging_dir", "tb", "--save_images_steps", 2)) == 0
    events = list((out / "tb").rglob("events.out.tfevents.*"))
    assert events and not (out / "logs").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent), size_guidance={"images": 0})
    accumulator.Reload()
    assert {"loss", "lr"} <= set(accumulator.Tags()["scalars"]) and "samples" in accumulator.Tags()["images"]


# ---------------------------------------------------------------------------------------------------------------
# --gradient_checkpointing, xformers, --local_rank
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["diffusers", "own"])
def test_gradient_checkpointing_is_bitwise_and_resumes_bitwise(tmp_path, tiny_data, monkeypatch, impl):
    """4 steps with gradient checkpointing, 2 of them resumed, give the weights of 4 straight steps without it."""
    import torch.utils.checkpoint

    recomputed, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *args, **kwargs: recomputed.append(1) or checkpoint(*args, **kwargs))
    common = ["--unet_impl", impl, "--lr_scheduler", "constant_with_warmup", "--checkpointing_steps", 2]
    assert train_accelerate.main(trainer_args(tmp_path / "plain", tiny_data, *common, "--max_train_steps", 4)) == 0
    assert not recomputed
    args = trainer_args(tmp_path / "gc", tiny_data, *common, "--gradient_checkpointing")
    assert train_accelerate.main([*args, "--max_train_steps", "2"]) == 0
    assert recomputed
    assert train_accelerate.main([*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        plain = load_file(tmp_path / "plain" / "checkpoints" / "checkpoint-4" / name)
        resumed = load_file(tmp_path / "gc" / "checkpoints" / "checkpoint-4" / name)
        assert plain.keys() == resumed.keys()
        for key in plain:
            assert torch.equal(plain[key], resumed[key]), (name, key)


@pytest.mark.parametrize("impl", ["diffusers", "own"])
def test_the_memory_check_counts_gradient_checkpointing(impl):
    """The trainer enables it before measuring a training step, so a batch that fits only with it is not refused."""
    from diffusers import UNet2DModel

    from ddpm_fashion.models.unet import UNet
    from ddpm_fashion.training.resources import measure_unet_bytes

    model = UNet2DModel(**SMOKE_UNET)
    model = UNet.from_diffusers(model) if impl == "own" else model
    plain = measure_unet_bytes(model, 8, training=True)
    run_options.speed_and_memory_options(model, types.SimpleNamespace(gradient_checkpointing=True),
                                         types.SimpleNamespace(enable_xformers_memory_efficient_attention=False))
    assert measure_unet_bytes(model, 8, training=True) < plain


def test_xformers_is_refused_when_it_is_not_installed(tmp_path, tiny_data, capsys):
    from diffusers.utils.import_utils import is_xformers_available

    if is_xformers_available():
        pytest.skip("xformers is installed")
    line = refusal(capsys, trainer_args(tmp_path / "out", tiny_data, "--enable_xformers_memory_efficient_attention"))
    assert "needs the xformers package" in line and not (tmp_path / "out").exists()


def test_preserve_input_precision_is_refused(tmp_path, tiny_data, capsys):
    line = refusal(capsys, trainer_args(tmp_path / "out", tiny_data, "--preserve_input_precision"))
    assert "--preserve_input_precision is not supported: images train as 8-bit" in line
    assert not (tmp_path / "out").exists()


def test_local_rank_is_accepted_as_the_example_does(capsys):
    for flag in (["--local_rank", "0"], ["--local-rank=0"]):
        assert train_accelerate.main(["--config", str(SMOKE), *flag, "--dry_run"]) == 0
        assert "local_rank" not in capsys.readouterr().out  # how to run, not what to train: not saved


def test_run_options_are_listed_in_errors(capsys):
    line = refusal(capsys, ["--config", str(SMOKE), "--no_such_flag", "1"])
    for option in run_options.RUN_OPTIONS:
        assert option in line
