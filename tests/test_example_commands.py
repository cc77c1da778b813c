"""The commands of diffusers' examples/unconditional_image_generation/README.md, run with train_accelerate.py in
place of train_unconditional.py, on an offline image folder this test writes.

Each command is copied below as the README types it. The test swaps in our script, points --dataset_name and
--train_data_dir at the folder, and adds only what makes it fit a test: two steps, a tiny U-Net
(--model_config_name_or_path, the example's own flag), a one-image two-step sample grid, a private datasets cache.
--push_to_hub needs the Hub: as typed, such a command is refused in one line before anything is written; it then
trains without that flag. The own-folder command runs through `accelerate launch`; the others run their script
arguments through main() in this process, which saves a launcher start-up each. The multi-GPU command (fp16,
wandb) trains where there are 2 GPUs and wandb; elsewhere it must be refused in one line naming what is missing.
"""

import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ENV, ROOT, SCRIPT

sys.path.insert(0, str(ROOT))
import train_accelerate  # noqa: E402

# huggingface/diffusers, examples/unconditional_image_generation/README.md at commit
# 58f3771545c81fe6e9179149414d16d251d13d37 (its last change, 2025-11-06), verbatim.
README_COMMANDS = {
    "flowers": """accelerate launch train_unconditional.py \\
  --dataset_name="huggan/flowers-102-categories" \\
  --resolution=64 --center_crop --random_flip \\
  --output_dir="ddpm-ema-flowers-64" \\
  --train_batch_size=16 \\
  --num_epochs=100 \\
  --gradient_accumulation_steps=1 \\
  --use_ema \\
  --learning_rate=1e-4 \\
  --lr_warmup_steps=500 \\
  --mixed_precision=no \\
  --push_to_hub""",
    "pokemon": """accelerate launch train_unconditional.py \\
  --dataset_name="huggan/pokemon" \\
  --resolution=64 --center_crop --random_flip \\
  --output_dir="ddpm-ema-pokemon-64" \\
  --train_batch_size=16 \\
  --num_epochs=100 \\
  --gradient_accumulation_steps=1 \\
  --use_ema \\
  --learning_rate=1e-4 \\
  --lr_warmup_steps=500 \\
  --mixed_precision=no \\
  --push_to_hub""",
    "multi-gpu": """accelerate launch --mixed_precision="fp16" --multi_gpu train_unconditional.py \\
  --dataset_name="huggan/pokemon" \\
  --resolution=64 --center_crop --random_flip \\
  --output_dir="ddpm-ema-pokemon-64" \\
  --train_batch_size=16 \\
  --num_epochs=100 \\
  --gradient_accumulation_steps=1 \\
  --use_ema \\
  --learning_rate=1e-4 \\
  --lr_warmup_steps=500 \\
  --mixed_precision="fp16" \\
  --logger="wandb\"""",
    "own-folder": """accelerate launch train_unconditional.py \\
    --train_data_dir <path-to-train-directory> \\
    <other-arguments>""",
}
# No attention: at the README's 64x64 an attention block's backward would take most of the test's time.
TINY_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "down_block_types": ["DownBlock2D",
             "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8}
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """32 colour images of 40x48 (configs/cpu.yaml's batch of 32 fits), a tiny UNet2DModel config, a cache."""
    from diffusers import UNet2DModel

    root = tmp_path_factory.mktemp("example-commands")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(32):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{i:02d}.png")
    UNet2DModel(**TINY_UNET).save_config(root / "tiny-unet")
    return root


def our_command(name, offline):
    """The README's command with our script and the offline folder: (launcher words, script arguments)."""
    words = shlex.split(README_COMMANDS[name].replace("\\\n", " "))  # a backslash-newline continues the line
    script = words.index("train_unconditional.py")
    launcher, args = [ACCELERATE, *words[1:script]], []
    for arg in words[script + 1:]:
        if arg.startswith("--dataset_name="):
            arg = f"--dataset_name={offline / 'images'}"
        elif arg == "<path-to-train-directory>":
            arg = str(offline / "images")
        if arg != "<other-arguments>":
            args.append(arg)
    shrink = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--model_config_name_or_path",
              str(offline / "tiny-unet"), "--eval_batch_size", "1", "--ddpm_num_inference_steps", "2",
              "--cache_dir", str(offline / "cache")]
    return launcher, [*args, *shrink]


def refused_in_process(args, cwd, capsys, monkeypatch):
    """Run main(args) in output_dir's parent; it must refuse in one line and write nothing. Get the line."""
    monkeypatch.chdir(cwd)
    before = sorted(Path(cwd).iterdir())
    assert train_accelerate.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train_accelerate.py: error: ") and "Traceback" not in "\n".join(err), err
    assert sorted(Path(cwd).iterdir()) == before
    return err[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flowers", "pokemon", "own-folder"])
def test_readme_command_trains_offline(name, offline, tmp_path, capsys, monkeypatch):
    import subprocess

    from diffusers import DDPMPipeline

    launcher, args = our_command(name, offline)
    if "--push_to_hub" in args:  # as typed: refused offline, in one line, before anything is written
        line = refused_in_process(args, tmp_path, capsys, monkeypatch)
        assert "--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set" in line
        args.remove("--push_to_hub")
    if name == "own-folder":  # through `accelerate launch`, as typed (configs/cpu.yaml's precision: auto)
        result = subprocess.run([*launcher, str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300, env={**ENV, "DDPM_FASHION_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        printed = result.stdout + result.stderr
    else:  # the script arguments in this process (mixed_precision no, as the trainer tests in this process)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("DDPM_FASHION_NUM_THREADS", "1")
        assert train_accelerate.main(args) == 0
        printed = "".join(capsys.readouterr())
    assert "done: 2 steps" in printed
    output_dir = tmp_path / (next((a.split("=", 1)[1] for a in args if a.startswith("--output_dir=")), None) or
                             "out-cpu")  # own-folder gives no --output_dir: configs/cpu.yaml's
    pipe = DDPMPipeline.from_pretrained(output_dir)
    expected = 64 if "--resolution=64" in args else pipe.unet.config.sample_size
    assert (pipe.unet.config.in_channels, pipe.unet.config.sample_size) == (3, expected)
    assert pipe.unet.config.block_out_channels == (16, 32) or list(pipe.unet.config.block_out_channels) == [16, 32]


@pytest.mark.slow
def test_readme_multi_gpu_command(offline, tmp_path, capsys, monkeypatch):
    """Trained as typed where it can be (2 GPUs, wandb installed); elsewhere refused in one line naming why."""
    from accelerate.utils import is_wandb_available

    launcher, args = our_command("multi-gpu", offline)
    if torch.cuda.device_count() >= 2 and is_wandb_available():
        import subprocess

        env = {**ENV, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
        result = subprocess.run([*launcher, str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return
    line = refused_in_process(args, tmp_path, capsys, monkeypatch)
    if not is_wandb_available():
        assert "--logger wandb needs the wandb package, which is not installed: pip install wandb" in line
    else:
        assert "fp16" in line or "process" in line
