"""benchmarks/gpu/: the device check runs end to end on a CPU at toy sizes, so it is ready whenever a GPU is lent."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ENV, ROOT

GPU_DIR = ROOT / "benchmarks" / "gpu"


def load_gpu_script(name):
    """Import benchmarks/gpu/<name>.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, GPU_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_check_runs_every_step_on_cpu_and_writes_numbers(tmp_path, real_data_dir):
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, str(GPU_DIR / "check.py"), "--device", "cpu", "--out", str(out)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    results = json.loads((out / "check.json").read_text())
    assert list(results) == ["env", "train_own_no", "train_speed", "sample", "compare", "unet_speed",
                             "gradient_checkpointing"]
    assert all(step["returncode"] == 0 and "parse_error" not in step for step in results.values()), results
    assert results["env"]["cuda_available"] is False and results["env"]["versions"]["diffusers"]
    train = results["train_own_no"]
    assert train["steps"] == 3 and train["images"] == 48 and train["img_per_s"] > 0
    assert "peak_gpu_memory_gib" not in train  # no GPU: the trainer prints no memory line
    assert results["train_speed"]["ratio"] > 0 and results["train_speed"]["example_img_per_s"] > 0
    assert results["sample"]["images"] == 2 and results["sample"]["size"] == [32, 32]
    assert results["sample"]["sampling_seconds"] < results["sample"]["seconds"]  # the step's own time is kept
    assert json.loads((out / "compare.json").read_text())
    assert len(results["unet_speed"]["table"]) == 8  # 4 tasks, wall clock and per CPU-second
    rows = json.loads((out / "gradient_checkpointing.json").read_text())["rows"]
    assert [row["batch_size"] for row in rows] == [4] and rows[0]["img_per_s"]["checkpointed"] > 0
    assert rows[0]["peak_rss_mib"]["plain"] > 100  # the whole trainer process: torch alone is more
    for name in results:
        assert (out / f"{name}.log").read_text().startswith(" ".join(results[name]["command"]))


def test_check_refuses_a_folder_that_holds_results(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    result = subprocess.run([sys.executable, str(GPU_DIR / "check.py"), "--device", "cpu", "--out", str(tmp_path)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]


def test_check_starts_no_step_once_its_budget_is_spent(tmp_path, capsys):
    check = load_gpu_script("check")
    assert check.main(["--device", "cpu", "--out", str(tmp_path / "c"), "--budget_s", "0"]) == 1
    results = json.loads((tmp_path / "c" / "check.json").read_text())
    assert {step["returncode"] for step in results.values()} == {"not started: budget spent"}
    assert "0 of 7 steps passed" in capsys.readouterr().out


def test_check_reads_the_trainers_closing_line_with_gpu_memory():
    check = load_gpu_script("check")
    from ddpm_fashion.training.clock import Clock

    clock = Clock({"images_seen": 0, "train_seconds": 0.0})
    clock.tick({"images_seen": 128, "train_seconds": 0.0})
    line = clock.done_line(200, {"images_seen": 25600}, "out").replace("; pipeline", ", peak GPU memory 7.25 GiB; "
                                                                                    "pipeline")
    numbers = check.parsed_numbers("train_own_bf16", line)
    assert numbers["steps"] == 200 and numbers["images"] == 25600 and numbers["peak_gpu_memory_gib"] == 7.25


def test_prepare_carries_only_what_the_device_lacks(tmp_path):
    prepare = load_gpu_script("prepare")
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# comment\nnumpy==2.0.0\nsafetensors @ file:///x.whl\nPillow==10.0\n")
    names = {pin.split("==")[0] for pin in prepare.wanted(prepare.device_packages(freeze))}
    assert {"diffusers", "accelerate", "transformers"} <= names
    assert not names & {"numpy", "safetensors", "pillow", "torch", "torchvision", "ruff", "pip"}
    assert not any(name.startswith("nvidia-") for name in names)


def test_run_sh_probe_writes_what_the_image_has(tmp_path):
    result = subprocess.run(["bash", str(GPU_DIR / "run.sh"), "probe"], cwd=ROOT, env={**ENV, "OUT": str(tmp_path),
                            "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "diffusers==" in (tmp_path / "device-freeze.txt").read_text()
    assert (tmp_path / "python-version.txt").read_text().strip() == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_the_gpu_plan_trains_both_unets_in_three_precisions_and_ends_with_the_suite(tmp_path):
    check = load_gpu_script("check")
    args = check.argparse.Namespace(device="cuda", train_steps=200, out=tmp_path)
    names = [name for name, _, _ in check.plan(args, tmp_path)]
    assert names == ["env", "cuda_tests", "train_own_no", "train_own_bf16", "train_own_fp16", "train_diffusers_no",
                     "train_diffusers_bf16", "train_diffusers_fp16", "train_speed", "sample", "compare", "unet_speed",
                     "unet_speed_compile", "gradient_checkpointing", "suite"]
    commands = {name: command for name, command, _ in check.plan(args, tmp_path)}
    assert commands["train_own_fp16"][commands["train_own_fp16"].index("--mixed_precision") + 1] == "fp16"
    assert str(check.ROOT / "configs" / "fashion_mnist.yaml") in commands["train_diffusers_bf16"]


def test_the_cuda_test_files_hold_the_cuda_only_tests():
    """The check's cuda_tests step selects `-k "cuda or gpu"` in these files: each must still hold such a test."""
    import re

    check = load_gpu_script("check")
    for path in check.CUDA_TEST_FILES:
        names = re.findall(r"^def (test_\w+)", (ROOT / "tests" / path).read_text(), flags=re.M)
        assert any("cuda" in name or "gpu" in name for name in names), path
