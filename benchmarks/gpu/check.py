"""The device check: everything a lent GPU should measure, in one call, every result written as JSON.

    python benchmarks/gpu/check.py --out DIR [--device cuda|cpu] [--budget_s 480] [--train_steps 200]

On a GPU (`--device cuda`, what benchmarks/gpu/run.sh starts on the device machine) it runs, in order of value, each
step in a child process with its own time limit, and stops starting steps when the budget is spent:

 1. env          torch/CUDA/GPU facts and the installed versions;
 2. cuda_tests   the test suite's CUDA-only tests (`-k "cuda or gpu"`);
 3. train_*      configs/fashion_mnist.yaml through `accelerate launch` for --train_steps steps in fp32, bf16 and
                 fp16 (the GradScaler path), with our U-Net and with UNet2DModel (--unet_impl diffusers): img/s
                 and peak GPU memory from the trainer's closing line;
 4. train_speed  benchmarks/train_speed.py: ours against the diffusers example's loop, same U-Net, bf16;
 5. sample       DDPMPipeline.from_pretrained(<the fp32 run>) on the device: 64 images, 1000 steps, images/s;
 6. compare      `ddpm-fashion compare --device <device>` on that pipeline;
 7. unet_speed   benchmarks/unet_speed.py on the device (eager, then torch.compile);
 8. gradient_checkpointing  benchmarks/gradient_checkpointing.py: img/s and peak memory with and without
                 --gradient_checkpointing, at batch 128 and 512;
 9. suite        the whole test suite, with whatever time is left.

`--device cpu` runs the same steps at toy sizes (configs/smoke.yaml, a few steps; one training run, ours in fp32; no
CUDA tests, compile or suite): the test suite runs it, so the script cannot rot while no GPU is lent. Each step's
output is in DIR/<step>.log; DIR/check.json has every step's command, exit code, seconds and parsed numbers.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PRECISIONS = ("no", "bf16", "fp16")
# The files that hold the CUDA-only tests (named for cuda or the gpu); listing them spares collecting the whole suite.
CUDA_TEST_FILES = ("schedulers/test_ddpm.py", "test_data.py", "commands/test_sample.py")
# The trainer's closing line (ddpm_fashion/training/clock.py): img/s after the first step, and peak memory on CUDA.
DONE_LINE = re.compile(r"done: (\d+) steps, (\d+) images seen, .*?([\d.]+) img/s \(([\d.]+) after the first step")
PEAK_MEMORY = re.compile(r"peak GPU memory ([\d.]+) GiB")


def tool(name: str) -> str:
    """Get the path of a console script installed beside this Python (accelerate, ddpm-fashion)."""
    return str(Path(sys.executable).parent / name)


def training_command(args, precision: str, unet_impl: str, output_dir: Path) -> list:
    """Get the README's `accelerate launch train_accelerate.py` line for one short run of the check."""
    config = "fashion_mnist.yaml" if args.device == "cuda" else "smoke.yaml"
    return [tool("accelerate"), "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
            "--mixed_precision", precision, str(ROOT / "train_accelerate.py"),
            "--config", str(ROOT / "configs" / config), "--output_dir", str(output_dir),
            "--max_train_steps", str(args.train_steps), "--checkpointing_steps", str(args.train_steps),
            "--save_images_epochs", "1000", "--logger", "none", "--unet_impl", unet_impl,
            "--eval_batch_size", "1", "--ddpm_num_inference_steps", "1"]


def sample_command(args, model: Path) -> list:
    """Get a child Python that samples through plain diffusers, as the README's one-liner does, and times it."""
    num_images, steps = (64, 1000) if args.device == "cuda" else (2, 3)
    code = (
        "import json, sys, time, torch\n"
        "from diffusers import DDPMPipeline\n"
        f"pipe = DDPMPipeline.from_pretrained({str(model)!r}).to({args.device!r})\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        f"start = time.perf_counter(); images = pipe(batch_size={num_images}, num_inference_steps={steps}).images\n"
        f"{'torch.cuda.synchronize()' if args.device == 'cuda' else 'pass'}\n"
        "seconds = time.perf_counter() - start\n"
        f"print(json.dumps({{'images': len(images), 'steps': {steps}, 'sampling_seconds': seconds, "
        f"'images_per_s': len(images) / seconds, 'size': list(images[0].size)}}))\n")
    return [sys.executable, "-c", code]


def plan(args, work: Path) -> list:
    """Get the check's steps as (name, command, time limit in seconds), most valuable first."""
    gpu, out = args.device == "cuda", args.out
    steps = [("env", [sys.executable, str(Path(__file__).with_name("env_facts.py"))], 60)]
    if gpu:  # on a CPU they only skip, as in every run of the suite (tests/test_benchmarks_gpu.py checks the files)
        steps.append(("cuda_tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-k",
                                     "cuda or gpu", *[str(ROOT / "tests" / path) for path in CUDA_TEST_FILES]], 240))
    # On a CPU one fp32 run of ours stands for all six: fp16 autocast is CUDA's, and the rest differ only in flags.
    for unet_impl in ("own", "diffusers") if gpu else ("own",):
        for precision in PRECISIONS if gpu else ("no",):
            name = f"train_{unet_impl}_{precision}"
            steps.append((name, training_command(args, precision, unet_impl, work / name), 240))
    speed = ["--steps", "100", "--rounds", "1", "--batch_size", "128"] if gpu else ["--steps", "2", "--rounds", "1",
                                                                                      "--batch_size", "4"]
    steps.append(("train_speed", [sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), *speed,
                                  "--mixed_precision", "bf16" if gpu else "no"], 240))
    model = work / "train_own_no"
    steps.append(("sample", sample_command(args, model), 240))
    steps.append(("compare", [tool("ddpm-fashion"), "compare", "--model", str(model), "--device", args.device,
                              "--num_inference_steps", "50" if gpu else "2", "--num_images", "16" if gpu else "2",
                              "--json", str(args.out / "compare.json")], 240))
    unet_speed = [sys.executable, str(ROOT / "benchmarks" / "unet_speed.py"), "--device", args.device,
                  "--skip_memory", "--rounds", "5" if gpu else "1", "--batch_size", "128" if gpu else "2"]
    if gpu:
        unet_speed += ["--config", str(ROOT / "configs" / "fashion_mnist.yaml"), "--precision", "bf16"]
    steps.append(("unet_speed", unet_speed, 180))
    if gpu:
        steps.append(("unet_speed_compile", [*unet_speed, "--compile"], 300))
    config, sizes = ("fashion_mnist.yaml", ["128", "512"]) if gpu else ("smoke.yaml", ["4"])
    steps.append(("gradient_checkpointing", [sys.executable, str(ROOT / "benchmarks" / "gradient_checkpointing.py"),
                                             "--config", str(ROOT / "configs" / config), "--batch_sizes", *sizes,
                                             "--steps", "50" if gpu else "3", "--rounds", "1",
                                             "--json", str(out / "gradient_checkpointing.json")], 240))
    if gpu:
        steps.append(("suite", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                                str(ROOT / "tests")], 100_000))
    return steps


def parsed_numbers(name: str, output: str) -> dict:
    """Get the numbers a step's output carries (img/s, memory, pass counts); empty when it has none."""
    numbers = {}
    if name.startswith("train_") and name != "train_speed" and (done := DONE_LINE.search(output)):
        numbers.update(steps=int(done.group(1)), images=int(done.group(2)), img_per_s=float(done.group(3)),
                       img_per_s_after_first_step=float(done.group(4)))
        if memory := PEAK_MEMORY.search(output):
            numbers["peak_gpu_memory_gib"] = float(memory.group(1))
    if name == "train_speed" and (ratio := re.search(r"([\d.]+) img/s .*?: ([\d.]+) img/s +ratio ([\d.]+)x", output)):
        numbers.update(ours_img_per_s=float(ratio.group(1)), example_img_per_s=float(ratio.group(2)),
                       ratio=float(ratio.group(3)))
    if name in ("env", "sample"):  # one JSON line among the libraries' progress bars and warnings
        numbers.update(json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{"))))
    if counts := re.findall(r"(\d+) (passed|failed|skipped|errors?)", output):
        numbers.update({kind: int(count) for count, kind in counts})
    if name == "gradient_checkpointing":
        numbers["table"] = [line for line in output.splitlines() if line.startswith("batch ")]
    if name.startswith("unet_speed"):
        numbers["table"] = [line.strip() for line in output.splitlines() if line.rstrip().endswith("x")]
    return numbers


def run_step(name: str, command: list, limit: float, out: Path) -> dict:
    """Run one step in a child process under its time limit; its output goes to out/<name>.log."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as timeout:
        code, output = "timeout", f"{timeout.stdout or ''}{timeout.stderr or ''}\n[stopped after {limit:.0f} s]"
        output = output if isinstance(output, str) else output.decode(errors="replace")
    (out / f"{name}.log").write_text(" ".join(command) + "\n\n" + output)
    try:
        numbers = parsed_numbers(name, output) if code == 0 else {}
    except (ValueError, StopIteration) as error:
        numbers = {"parse_error": str(error)}
    return {"command": command, "returncode": code, "seconds": round(time.perf_counter() - start, 1), **numbers}


def main(argv=None) -> int:
    """Run the check's steps within the budget and write out/check.json; exit 1 if any step failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a new or empty folder for the logs and JSON")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--budget_s", type=float, default=480, help="start no step after this many seconds")
    parser.add_argument("--train_steps", type=int, default=None, help="steps per training run (cuda 200, cpu 3)")
    args = parser.parse_args(argv)
    args.train_steps = args.train_steps or (200 if args.device == "cuda" else 3)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty; give a new folder (the check never overwrites results)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "runs"
    deadline = time.perf_counter() + args.budget_s
    results = {}
    for name, command, limit in plan(args, work):
        left = deadline - time.perf_counter()
        if left <= 5:
            results[name] = {"command": command, "returncode": "not started: budget spent"}
            continue
        results[name] = run_step(name, command, min(limit, left), args.out)
        print(f"{name}: exit {results[name]['returncode']} in {results[name]['seconds']} s", flush=True)
        (args.out / "check.json").write_text(json.dumps(results, indent=2) + "\n")  # kept even if a later step hangs
    (args.out / "check.json").write_text(json.dumps(results, indent=2) + "\n")
    failed = [name for name, result in results.items() if result["returncode"] != 0 or "parse_error" in result]
    print(f"check: {len(results) - len(failed)} of {len(results)} steps passed"
          + (f"; not passed: {', '.join(failed)}" if failed else "") + f"; results in {args.out}/check.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
