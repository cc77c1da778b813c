"""train_accelerate.py end to end: the published pipeline, the resolved config, bad input, precision, launchers and
torch.compile, and what it reports. Checkpoints and resume: tests/training/test_checkpointing.py; run folders:
tests/training/test_run_dir.py."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import (
    ENV,
    MULTI_PROCESS,
    ROOT,
    SCRIPT,
    SMOKE,
    checkpoint_tensors,
    run_training,
    train_in_process,
    trainer_state,
)

sys.path.insert(0, str(ROOT))
import train_accelerate  # noqa: E402


@pytest.mark.slow
def test_smoke_run_publishes_a_plain_diffusers_pipeline(smoke_run):
    output_dir, result = smoke_run
    index = json.loads((output_dir / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for name in ("README.md", "samples.png", "loss.png", "train_config.yaml"):
        assert (output_dir / name).is_file(), name
    assert "library_name: diffusers" in (output_dir / "README.md").read_text()
    assert "done: 12 steps" in result.stdout + result.stderr
    # a fresh process that never imports ddpm_fashion loads and runs it
    code = ("import sys, torch; from diffusers import DDPMPipeline; "
            f"pipe = DDPMPipeline.from_pretrained({str(output_dir)!r}); "
            "out = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type='np'); "
            "assert 'ddpm_fashion' not in sys.modules; "
            "assert pipe.scheduler.config.num_train_timesteps == 1000; print(out.images.shape)")
    loaded = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "(2, 32, 32, 1)" in loaded.stdout


def test_own_and_diffusers_unet_train_identically(tmp_path, train_data_dir):
    runs = {}
    for impl in ("own", "diffusers"):
        train_in_process(tmp_path / impl, train_data_dir, "--unet_impl", impl, "--max_train_steps", 4,
                     "--checkpointing_steps", 4, "--save_images_steps", 100)
        runs[impl] = trainer_state(tmp_path / impl, 4)["losses"]
    assert len(runs["own"]) == 4
    assert runs["own"] == pytest.approx(runs["diffusers"], rel=1e-4)


@pytest.mark.slow
@MULTI_PROCESS
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, train_data_dir):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun is not installed beside this Python")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    # checkpointing_minutes this small makes a checkpoint due after every step: rank 0's clock decides for both
    # processes (their clocks differ; had each decided alone, one would wait in save_state for the other forever).
    common = ["--max_train_steps", 4, "--checkpointing_steps", 4, "--save_images_steps", 100,
              "--checkpointing_minutes", 1e-6]
    train_in_process(tmp_path / "one", train_data_dir, *common, "--train_batch_size", 16)
    run_training(tmp_path / "two", train_data_dir, *common, "--train_batch_size", 8,
                 launcher=(torchrun, "--nproc_per_node", "2", "--master_port", "29517"))
    for run in ("one", "two"):  # steps 1-3 by time, 4 by steps; smoke.yaml keeps the last 2
        assert sorted(os.listdir(tmp_path / run / "checkpoints")) == ["checkpoint-3", "checkpoint-4"]
    assert trainer_state(tmp_path / "two", 4)["losses"] == pytest.approx(
        trainer_state(tmp_path / "one", 4)["losses"], rel=1e-5)
    model_one, _ = checkpoint_tensors(tmp_path / "one", 4)
    model_two, _ = checkpoint_tensors(tmp_path / "two", 4)
    for key in model_one:
        # Adam divides by sqrt(v): a float-rounding difference in a near-zero gradient moves a weight by a
        # fraction of lr, so compare against the size of an update (lr 1e-3), not the weight.
        torch.testing.assert_close(model_two[key], model_one[key], rtol=1e-4, atol=1e-5)


def test_dry_run_prints_the_resolved_config(capsys):
    assert train_accelerate.main(["--config", str(SMOKE), "--learning_rate", "3e-4", "--unet.layers_per_block",
                                  "2", "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "learning_rate: 0.0003" in printed
    assert "layers_per_block: 2" in printed


def test_default_config_is_the_gpu_config_when_a_gpu_is_present(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_accelerate.main(["--dry_run"]) == 0
    captured = capsys.readouterr()
    assert "block_out_channels:\n  - 64\n  - 128" in captured.out
    assert captured.err == ""


def test_without_gpu_or_config_the_cpu_config_is_trained_and_said_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_accelerate.main(["--dry_run"]) == 0
    captured = capsys.readouterr()
    assert "output_dir: out-cpu" in captured.out  # configs/cpu.yaml
    assert captured.err.count("\n") == 1 and "no GPU found" in captured.err
    assert "--config configs/fashion_mnist.yaml" in captured.err
    # an explicit --config is obeyed without a word
    assert train_accelerate.main(["--config", str(ROOT / "configs" / "fashion_mnist.yaml"), "--dry_run"]) == 0
    captured = capsys.readouterr()
    assert "output_dir: out\n" in captured.out and captured.err == ""


@pytest.mark.parametrize("extra, message", [
    (["--learning_rate", "-1"], "learning_rate must be positive"),
    (["--snr_weight_floor", "0.1"], "snr_weight_floor must be positive, with snr_gamma set, or null; got 0.1"),
    (["--snr_gamma", "5", "--snr_weight_floor", "0"], "snr_weight_floor must be positive"),
    (["--train_batch_size", "0"], "train_batch_size must be at least 1"),
    (["--learning_rate", "fast"], "invalid float value"),
    (["--no_such_key", "1"], "unknown argument"),
    (["--unet.down_block_types", "[CrossAttnDownBlock2D, DownBlock2D]"], "CrossAttnDownBlock2D"),
    (["--unet.sample_size", "31"], "sample_size"),
    (["--unet.sample_size", "64"], "sample_size"),
    (["--mixed_precision", "fp16"], "fp16"),
    (["--data_dir", "/nonexistent/fashion"], "/nonexistent/fashion"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "not a checkpoint folder"),
    (["--unet.bogus", "1"], r"unknown UNet config key\(s\) \['bogus'\]"),
    (["--unet.norm_num_groups", "0"], "norm_num_groups=0 is not supported"),
    (["--unet.block_out_channels", "16"], "block_out_channels=16 is not supported"),
    (["--unet.block_out_channels", "[16,"], "is not a valid YAML value"),
    (["--learning_rate", "inf"], "learning_rate must be a finite number"),
    (["--adam_beta1", "nan"], "adam_beta1 must be a finite number"),
    (["--max_grad_norm", "inf"], "max_grad_norm must be a finite number"),
    (["--seed", "99999999999999999999"], "seed must be an integer from 0 to 4294967295"),
    (["--train_batch_size", "1000000000"], "more than the .* training images"),
    (["--eval_batch_size", "1000000000"], "lower --eval_batch_size"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, train_data_dir, capsys, extra, message):
    if extra[0] == "--mixed_precision" and torch.cuda.is_available():
        pytest.skip("fp16 is valid on this machine: it has a GPU")
    output_dir = tmp_path / "out"
    data = [] if "--data_dir" in extra else ["--data_dir", train_data_dir]
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(output_dir), *data, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(message, err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not output_dir.exists()


@pytest.mark.parametrize("content, message", [
    ("unet: [16, 32]\n", "unet in config file .* must be a mapping"),
    ("unet: null\n", "unet in config file .* must be a mapping"),
    ("unet: {block_out_channels: 16}\n", "block_out_channels=16 is not supported"),
    (b"\x7fELF\x02\x01\x01\x00\xff\xfe", "is not UTF-8 text"),
])
def test_bad_config_file_is_one_line_exit_2(tmp_path, capsys, content, message):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = train_accelerate.main(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_output_dir_that_is_not_ours_is_refused(tmp_path, train_data_dir, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(tmp_path), "--data_dir",
                                  train_data_dir])
    assert code == 2
    assert "not a ddpm_fashion run" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_unwritable_output_dir_is_refused(capsys, train_data_dir):
    code = train_accelerate.main(["--config", str(SMOKE), "--output_dir", "/sys/ddpm-out", "--data_dir",
                                  train_data_dir])
    assert code == 2
    assert "not writable" in capsys.readouterr().err


SLOW_BF16 = textwrap.dedent("""
    # Launch the trainer as if this machine had no native bf16.
    import sys
    sys.path.insert(0, {root!r})
    import train_accelerate
    train_accelerate.has_fast_bf16 = lambda device: False
    sys.exit(train_accelerate.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_bf16_mixed_precision_on_cpu_with_tensorboard_logging(tmp_path, train_data_dir):
    output_dir = tmp_path / "out"
    launcher = tmp_path / "slow_bf16.py"
    launcher.write_text(SLOW_BF16.format(root=str(ROOT)))
    # A subprocess: Accelerate's process-wide state keeps the precision of the first Accelerator made in a process.
    result = run_training(output_dir, train_data_dir, "--mixed_precision", "bf16", "--logger", "tensorboard",
                          "--max_train_steps", 4, "--checkpointing_steps", 4, "--save_images_steps", 2, script=launcher)
    assert result.stdout.count("has no native bf16, so mixed_precision=bf16 may train slower") == 1
    losses = trainer_state(output_dir, 4)["losses"]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    events = list((output_dir / "logs").rglob("events.out.tfevents.*"))
    assert events and all(event.stat().st_size > 0 for event in events)
    published = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in published.values()} == {torch.float32}  # autocast, not bf16 weights


def test_auto_on_a_cpu_without_native_bf16_trains_float32_with_the_float32_recipe(tmp_path, train_data_dir, capsys,
                                                                                  monkeypatch):
    monkeypatch.setattr(train_accelerate, "has_fast_bf16", lambda device: False)  # a CPU without AVX-512 BF16 / AMX
    recipe = ("--float32", "{learning_rate: 2.0e-4, unet: {block_out_channels: [8, 16]}}")
    train_in_process(tmp_path / "auto", train_data_dir, "--mixed_precision", "auto", "--max_train_steps", 1,
                     "--save_images_steps", 100, *recipe)
    assert "mixed precision no (auto: this device has no native bf16, so float32, with the config's float32 recipe " \
           "{'learning_rate': 0.0002, 'unet': {'block_out_channels': [8, 16]}})" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "auto" / "train_config.yaml").read_text())
    assert saved["mixed_precision"] == "no" and saved["unet"]["block_out_channels"] == [8, 16]
    assert saved["learning_rate"] == 2e-4
    published = json.loads((tmp_path / "auto" / "unet" / "config.json").read_text())
    assert published["block_out_channels"] == [8, 16] and published["down_block_types"] == ["DownBlock2D",
                                                                                             "AttnDownBlock2D"]
    # where bf16 is native, or the precision is not `auto`, the recipe changes nothing: such a machine cannot resume
    # the run above, and says why
    monkeypatch.setattr(train_accelerate, "has_fast_bf16", lambda device: True)
    assert train_accelerate.main(["--config", str(SMOKE), "--output_dir", str(tmp_path / "auto"), "--data_dir",
                                  str(train_data_dir), "--mixed_precision", "auto", "--max_train_steps", "2", *recipe,
                                  "--resume_from_checkpoint", "latest"]) == 2
    error = capsys.readouterr().err
    assert "unet.block_out_channels: [8, 16] -> [16, 32]" in error, error
    assert "output_dir; the config's float32 recipe applies only where mixed_precision auto picks float32" in error
    train_in_process(tmp_path / "explicit", train_data_dir, "--mixed_precision", "no", "--max_train_steps", 1,
                     "--save_images_steps", 100, *recipe)
    saved = yaml.safe_load((tmp_path / "explicit" / "train_config.yaml").read_text())
    assert saved["unet"]["block_out_channels"] == [16, 32] and saved["learning_rate"] == 1e-3


def test_min_snr_v_prediction_and_stratified_timesteps_train_and_publish(tmp_path, train_data_dir):
    common = ("--max_train_steps", 1, "--checkpointing_steps", 1, "--save_images_steps", 100, "--lr_warmup_steps", 0)
    train_in_process(tmp_path / "plain", train_data_dir, *common)
    train_in_process(tmp_path / "weighted", train_data_dir, *common, "--snr_gamma", 5)
    train_in_process(tmp_path / "floored", train_data_dir, *common, "--snr_gamma", 5, "--snr_weight_floor", 1)
    plain, _ = checkpoint_tensors(tmp_path / "plain", 1)
    weighted, _ = checkpoint_tensors(tmp_path / "weighted", 1)
    floored, _ = checkpoint_tensors(tmp_path / "floored", 1)
    assert any(not torch.equal(plain[name], weighted[name]) for name in plain)  # the weights changed the step
    # eps weights min(SNR, 5) / SNR never exceed 1, so a floor of 1 gives every sample weight 1: the plain step
    assert all(torch.equal(plain[name], floored[name]) for name in plain)
    output_dir = tmp_path / "v"
    train_in_process(output_dir, train_data_dir, *common, "--prediction_type", "v_prediction", "--snr_gamma", 5,
                     "--timestep_sampling", "stratified")
    scheduler = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    saved = (output_dir / "train_config.yaml").read_text()
    assert "snr_gamma: 5.0" in saved and "timestep_sampling: stratified" in saved


def test_images_seen_counts_real_images_of_a_short_last_batch(tmp_path, capsys):
    from conftest import write_synthetic_fashion_mnist

    data = tmp_path / "data"
    data.mkdir()
    write_synthetic_fashion_mnist(data, num_train=40, num_test=10)
    output_dir = tmp_path / "out"
    train_in_process(output_dir, data, "--max_train_steps", "3", "--checkpointing_steps", "3",
                     "--save_images_steps", "100")  # batches of 16, 16, 8: one epoch of 40 images
    assert trainer_state(output_dir, 3)["images_seen"] == 40
    assert "| images seen | 40 |" in (output_dir / "README.md").read_text()
    assert "40 images seen" in capsys.readouterr().out


@pytest.mark.slow
def test_the_done_line_times_the_first_step_apart_and_the_ablation_reads_it(smoke_run):
    """torch.compile compiles during the first step: the trainer reports it apart, and the study's table shows it."""
    from conftest import load_benchmark

    ablation = load_benchmark("ablation")
    _, result = smoke_run
    match = ablation.DONE_LINE.search(result.stdout)
    assert match and match["first_step"] is not None, result.stdout[-500:]
    assert float(match["after_first_step"]) > 0 and float(match["first_step"]) > 0
    study = {"protocol": {"num_samples": 1000}, "rows": {"real-train": {"fid": 0.06, "class_kl": 0.002}},
             "speed": {"bf16-v-minsnr5-inductor": {"img_per_s": 80.0, "img_per_s_after_first_step": 160.0,
                                                   "first_step_seconds": 71.0, "steps": 150}}}
    assert "| `bf16-v-minsnr5-inductor` | bf16 + v-prediction + min-SNR-5, torch.compile (`--dynamo_backend " \
           "inductor`) | 150 | 80.0 | 160.0 | 71.0 |" in ablation.markdown_table(study)


@pytest.mark.slow
def test_mixed_precision_is_the_launchers_unless_the_config_sets_it(tmp_path, train_data_dir):
    accelerate = (str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1",
                  "--mixed_precision", "bf16")
    common = ("--max_train_steps", 1, "--save_images_steps", 100)
    result = run_training(tmp_path / "launcher", train_data_dir, *common, launcher=accelerate)
    assert "mixed precision bf16 (the launcher's)" in result.stdout
    # a launched CPU run uses every core (accelerate launch sets OMP_NUM_THREADS=1; that is no user's choice)
    from ddpm_fashion.training.resources import physical_cores

    assert f"{physical_cores()} torch threads per process" in result.stdout
    assert "mixed_precision: bf16" in (tmp_path / "launcher" / "train_config.yaml").read_text()
    result = run_training(tmp_path / "config", train_data_dir, *common, "--mixed_precision", "no", launcher=accelerate)
    assert "mixed precision no (set in the config)" in result.stdout
    assert "mixed_precision: 'no'" in (tmp_path / "config" / "train_config.yaml").read_text()


@pytest.mark.slow
def test_accelerate_dynamo_backend_publishes_a_complete_pipeline_and_resumes_without_it(tmp_path, train_data_dir):
    """`accelerate launch --dynamo_backend ...` hands the trainer a torch.compile'd model: it is saved unwrapped.

    The eager backend compiles (dynamo captures the graphs) without inductor's minutes of code generation.
    """
    accelerate = (str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1",
                  "--dynamo_backend", "eager")
    common = ("--checkpointing_steps", 2, "--save_images_steps", 2)
    result = run_training(tmp_path / "compiled", train_data_dir, "--max_train_steps", 2, *common, launcher=accelerate)
    assert "cannot be saved" not in result.stdout + result.stderr
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "compiled" / weights).is_file()
    # two compiled steps, a checkpoint, two plain steps resumed from it: the weights of four plain steps
    train_in_process(tmp_path / "compiled", train_data_dir, "--max_train_steps", 4, "--resume_from_checkpoint",
                     "latest", *common)
    train_in_process(tmp_path / "plain", train_data_dir, "--max_train_steps", 4, *common)
    resumed, plain = load_file(tmp_path / "compiled" / weights), load_file(tmp_path / "plain" / weights)
    assert resumed.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(resumed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_bad_input_through_accelerate_launch_shows_our_line(tmp_path):
    """accelerate launch re-raises a failed child as CalledProcessError (README says so); our line is there."""
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--num_processes", "1", "--quiet", str(SCRIPT), "--config", str(SMOKE),
               "--output_dir", str(tmp_path / "out"), "--learning_rate", "-1"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "train_accelerate.py: error: learning_rate must be positive, got -1.0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
