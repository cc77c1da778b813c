"""Gradient checkpointing: the trainer's img/s and peak memory with and without `--gradient_checkpointing`.

    python benchmarks/gradient_checkpointing.py [--config configs/cpu.yaml] [--batch_sizes 32 128] [--steps 30]
        [--rounds 2] [--json FILE]

Each run is the README's trainer, `accelerate launch train_accelerate.py --config ... --max_train_steps N`, in a child
process, for each batch size with and without the flag; rounds alternate which goes first, so load from other work
hits both alike. img/s is the trainer's own, after its first step (its closing line). Peak memory is the trainer
process's peak RSS (getrusage of the waited-for child: the whole process, libraries and data included, so the
difference between the two is what checkpointing saves) and, on a GPU, the trainer's peak GPU memory. Prints a table
of medians with the ratios (checkpointed / plain).
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AFTER_FIRST_STEP = re.compile(r"([\d.]+) after the first step")
PEAK_GPU = re.compile(r"peak GPU memory ([\d.]+) GiB")
# A child that runs the trainer and prints the peak RSS (KiB on Linux) of the largest child it waited for.
PEAK_RSS_WRAPPER = ("import resource, subprocess, sys\n"
                    "result = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
                    "sys.stdout.write(result.stdout + result.stderr)\n"
                    "print(f'peak RSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} KiB')\n"
                    "sys.exit(result.returncode)\n")


def run_trainer(config, batch_size, steps, checkpointing, output_dir) -> dict:
    """Train `steps` steps through accelerate launch; get img/s after the first step and the peak memory."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
               str(ROOT / "train_accelerate.py"), "--config", str(config), "--output_dir", str(output_dir),
               "--train_batch_size", str(batch_size), "--max_train_steps", str(steps),
               "--checkpointing_steps", str(10 * steps), "--save_images_epochs", "1000", "--logger", "none",
               "--eval_batch_size", "1", "--ddpm_num_inference_steps", "1"]
    if checkpointing:
        command.append("--gradient_checkpointing")
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, *command], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"trainer failed ({result.returncode}): {result.stdout[-2000:]}")
    measured = {"img_per_s": float(AFTER_FIRST_STEP.search(result.stdout).group(1)),
                "peak_rss_mib": int(re.search(r"peak RSS (\d+) KiB", result.stdout).group(1)) / 1024}
    if gpu := PEAK_GPU.search(result.stdout):
        measured["peak_gpu_gib"] = float(gpu.group(1))
    return measured


def measure(args) -> list:
    """Get one row per batch size: medians over rounds of each side, and the ratios."""
    rows = []
    for batch_size in args.batch_sizes:
        runs = {False: [], True: []}
        for round_index in range(args.rounds):
            for checkpointing in (False, True) if round_index % 2 == 0 else (True, False):
                with tempfile.TemporaryDirectory() as tmp:
                    runs[checkpointing].append(run_trainer(args.config, batch_size, args.steps, checkpointing,
                                                           Path(tmp) / "out"))
        row = {"batch_size": batch_size}
        for key in runs[False][0]:
            plain = statistics.median(run[key] for run in runs[False])
            checkpointed = statistics.median(run[key] for run in runs[True])
            row[key] = {"plain": plain, "checkpointed": checkpointed, "ratio": checkpointed / plain}
        rows.append(row)
    return rows


def main(argv=None):
    """Measure, print the table, and write it as JSON with --json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cpu.yaml")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here (a new file)")
    args = parser.parse_args(argv)
    if args.json is not None and args.json.exists():
        parser.error(f"--json {args.json} exists; give a new file")
    rows = measure(args)
    print(f"{args.config.name}, {args.steps} steps, {args.rounds} rounds (medians; ratio = checkpointed / plain)")
    for row in rows:
        cells = [f"{key} {value['plain']:.1f} -> {value['checkpointed']:.1f} ({value['ratio']:.2f}x)"
                 for key, value in row.items() if key != "batch_size"]
        print(f"batch {row['batch_size']}: " + ", ".join(cells))
    if args.json is not None:
        args.json.write_text(json.dumps({"config": str(args.config), "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
