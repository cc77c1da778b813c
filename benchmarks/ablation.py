"""Which levers make configs/cpu.yaml learn more per CPU-hour: one training run per row, at equal images (or time).

    python benchmarks/ablation.py [--rows NAME ...] [--epochs 1] [--num_samples 1000] [--batch_size 250]
        [--workdir /work/runs/ablation] [--json benchmarks/results/ablation.json]
    python benchmarks/ablation.py --speed_steps 150 [--rows NAME ...]     # img/s only, short runs, idle machine
    python benchmarks/ablation.py --epochs 2 --rows cpu-yaml cpu-yaml-noema --json benchmarks/results/ablation_2ep.json
    python benchmarks/ablation.py --epochs 2 --equal_time_to cpu-yaml --rows cpu-yaml cpu-yaml-wide \
        --json benchmarks/results/ablation_equal_time.json     # equal time, not equal images

Every row trains the study's base (benchmarks/ablation_base.yaml: configs/cpu.yaml as it was) plus the row's
overrides for the same number of images (`--epochs` x 60,000; max_train_steps = images / train_batch_size, so the LR
schedule spans the row's own run) with the README's command, `accelerate launch train_accelerate.py --config ...`,
then samples N images from the published pipeline with DPM-Solver++ 20 steps and DDIM 50 steps (the CLI's
`--scheduler dpm` and `--scheduler ddim-to-t0`) and
scores them with the project's Evaluator (FID over `fmnist` features, class KL from uniform, precision/recall)
against the FashionMNIST test set, beside the real-training-images floor at the same N. img/s is the trainer's own
figure for the whole run (its `done:` line); as a long study shares the machine with other work, `--speed_steps N`
re-times each row alone with an N-step run of the same command (JSON `speed`). Every row starts from the same
seed, so rows differ only by their change. With `--equal_time_to ROW` the rows get equal time instead: each is first
timed alone (TIMING_STEPS steps, JSON `speed`) and then trains --epochs x its img/s / ROW's img/s, the images it
processes in the time ROW takes for --epochs, so a slower model that learns more per image is judged per CPU-hour.
The rows stack greedily: the first ones change one thing of cpu.yaml in bf16; once min-SNR-5 led, the `minsnr5-*`
rows change one thing of bf16 + min-SNR-5; the `cpu-yaml-*` rows change one thing of today's configs/cpu.yaml.

Rows run in the order given; a row already in --json under the same protocol is kept, and a row whose model
folder already holds a finished pipeline trained with exactly the row's resolved config (`--dry_run`; a key the
trainer gained since counts at its default) is scored without retraining. The JSON is rewritten after each row, so
a long study can stop and continue; a --json made under another protocol is refused (exit 2, naming what differs)
rather than replaced.
"""

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ddpm_fashion.evaluation.sample_quality import Evaluator, machine_description, real_training_images  # noqa: E402
from ddpm_fashion.guards.files import atomic_output  # noqa: E402
from ddpm_fashion.sampling.generate import generate_images  # noqa: E402
from ddpm_fashion.sampling.saved_pipeline import build_scheduler, load_pipeline  # noqa: E402
from ddpm_fashion.training.config import with_new_keys_at_defaults  # noqa: E402
from studies import continue_study  # noqa: E402

TRAIN_IMAGES = 60_000
# configs/cpu.yaml as the study found it (the protocol still calls it cpu.yaml); cpu.yaml now holds the winners.
BASE_CONFIG = ROOT / "benchmarks" / "ablation_base.yaml"
# Keys that say where and how often a run writes, not what it trains: ignored when a finished folder is reused.
INCIDENTAL_KEYS = ("output_dir", "logger", "save_images_epochs", "checkpointing_steps", "checkpointing_minutes",
                   "checkpoints_total_limit")
SAMPLERS = (("dpm", 20), ("ddim", 50))
# The study's DDIM walks down to t = 0, as the CLI's `ddim` did when its rows were scored (it now ends earlier).
SCHEDULER_OF = {"dpm": "dpm", "ddim": "ddim-to-t0"}
BF16 = ["--mixed_precision", "bf16"]
MIN_SNR = BF16 + ["--snr_gamma", "5"]  # the leader after the first rows: later rows stack on it
# configs/cpu.yaml's levers, each a measured row, together (`auto` precision is bf16 on the study's CPU), on the
# base's U-Net: attention at 8x8 in the down and up blocks, what cpu.yaml trained until the cpu-yaml-noattn row, its
# U-Net now, won at full length (docs/results.md)
CPU_YAML = BF16 + ["--prediction_type", "v_prediction", "--snr_gamma", "5", "--timestep_sampling", "stratified",
                   "--train_batch_size", "32"]
WIDE = ["--unet.block_out_channels", "[48, 96, 192]"]
# UNet2DModel's middle block keeps its attention (add_attention, 8x8 here): "noattn" drops only the blocks' attention
NO_ATTENTION = ["--unet.down_block_types", "[DownBlock2D, DownBlock2D, DownBlock2D]",
                "--unet.up_block_types", "[UpBlock2D, UpBlock2D, UpBlock2D]"]
ATTENTION_AT_16 = ["--unet.down_block_types", "[DownBlock2D, AttnDownBlock2D, AttnDownBlock2D]",
                   "--unet.up_block_types", "[AttnUpBlock2D, AttnUpBlock2D, UpBlock2D]"]
# name: (what changed, overrides on top of the base, BASE_CONFIG)
ROWS = {
    "fp32": ("cpu.yaml as it was: float32", ["--mixed_precision", "no"]),
    "bf16": ("bf16 autocast (attention kept in float32 on the CPU)", BF16),
    "bf16-minsnr5": ("bf16 + min-SNR-5 loss weights", BF16 + ["--snr_gamma", "5"]),
    "bf16-v-minsnr5": ("bf16 + v-prediction + min-SNR-5", BF16 + ["--prediction_type", "v_prediction",
                                                                 "--snr_gamma", "5"]),
    "bf16-v": ("bf16 + v-prediction (no min-SNR)", BF16 + ["--prediction_type", "v_prediction"]),
    "fp32-v-minsnr5": ("float32 + v-prediction + min-SNR-5", ["--mixed_precision", "no", "--prediction_type",
                                                               "v_prediction", "--snr_gamma", "5"]),
    "bf16-stratified": ("bf16 + stratified timesteps", BF16 + ["--timestep_sampling", "stratified"]),
    "bf16-lr1e-3": ("bf16 + learning rate 1e-3", BF16 + ["--learning_rate", "1e-3"]),
    "bf16-lr2e-4": ("bf16 + learning rate 2e-4", BF16 + ["--learning_rate", "2e-4"]),
    "bf16-warmup50": ("bf16 + 50 warm-up steps (not 200)", BF16 + ["--lr_warmup_steps", "50"]),
    "bf16-batch32": ("bf16 + batch 32 (twice the steps)", BF16 + ["--train_batch_size", "32"]),
    "bf16-batch128": ("bf16 + batch 128 (half the steps)", BF16 + ["--train_batch_size", "128"]),
    "bf16-ema0.995": ("bf16 + EMA decay capped at 0.995", BF16 + ["--ema_max_decay", "0.995"]),
    "bf16-noema": ("bf16, no EMA (the raw weights)", BF16 + ["--use_ema", "false"]),
    "bf16-wide": ("bf16 + U-Net (48, 96, 192)", BF16 + WIDE),
    "bf16-attn16": ("bf16 + attention at 16x16 and 8x8", BF16 + ATTENTION_AT_16),
    "minsnr5-lr1e-3": ("bf16 + min-SNR-5 + learning rate 1e-3", MIN_SNR + ["--learning_rate", "1e-3"]),
    "minsnr5-stratified": ("bf16 + min-SNR-5 + stratified timesteps", MIN_SNR + ["--timestep_sampling", "stratified"]),
    "minsnr5-batch32": ("bf16 + min-SNR-5 + batch 32 (twice the steps)", MIN_SNR + ["--train_batch_size", "32"]),
    "minsnr5-ema0.995": ("bf16 + min-SNR-5 + EMA decay capped at 0.995", MIN_SNR + ["--ema_max_decay", "0.995"]),
    "bf16-v-minsnr5-inductor": ("bf16 + v-prediction + min-SNR-5, torch.compile (`--dynamo_backend inductor`)",
                                BF16 + ["--prediction_type", "v_prediction", "--snr_gamma", "5"]),
    "cpu-yaml": ("configs/cpu.yaml's recipe until 2026-12-05: bf16 + v-prediction + min-SNR-5 + stratified "
                 "timesteps + batch 32, attention at 8x8",
                 CPU_YAML),
    "cpu-yaml-noema": ("configs/cpu.yaml's recipe, no EMA (the raw weights)", CPU_YAML + ["--use_ema", "false"]),
    "bf16-noattn": ("bf16, attention only in the middle block", BF16 + NO_ATTENTION),
    "cpu-yaml-wide": ("configs/cpu.yaml's recipe, U-Net (48, 96, 192)", CPU_YAML + WIDE),
    "cpu-yaml-noattn": ("configs/cpu.yaml's recipe, attention only in the middle block (cpu.yaml since 2026-12-05)",
                        CPU_YAML + NO_ATTENTION),
    "cpu-yaml-attn16": ("configs/cpu.yaml's recipe, attention at 16x16 and 8x8", CPU_YAML + ATTENTION_AT_16),
    "cpu-yaml-floor0.1": ("configs/cpu.yaml's recipe, min-SNR weights of the capped timesteps at least 0.1",
                          CPU_YAML + ["--snr_weight_floor", "0.1"]),
    "cpu-yaml-gamma20": ("configs/cpu.yaml's recipe, min-SNR-20 (not 5)", CPU_YAML + ["--snr_gamma", "20"]),
}
# `accelerate launch` options of rows that change how a run is launched, not what it trains.
LAUNCH_OPTIONS = {"bf16-v-minsnr5-inductor": ["--dynamo_backend", "inductor"]}
# The trainer's last line; older runs lack the part after the first step.
DONE_LINE = re.compile(r"done: \d+ steps, \d+ images seen, (?P<seconds>\d+) s this session, (?P<img_per_s>[\d.]+) "
                       r"img/s(?: \((?P<after_first_step>[\d.]+) after the first step, which took "
                       r"(?P<first_step>[\d.]+) s\))?")
# An equal-time study (--equal_time_to) times each row alone with a run this many steps long.
TIMING_STEPS = 300
DEFAULT_ROWS = ("bf16", "fp32", "bf16-minsnr5", "bf16-v-minsnr5", "minsnr5-lr1e-3", "minsnr5-batch32",
                "minsnr5-stratified", "minsnr5-ema0.995")


def trainer_args(name: str, epochs: float, output_dir: Path) -> list:
    """Get train_accelerate.py's arguments for a row: the base config, the run's length, the row's overrides."""
    overrides = ROWS[name][1]
    batch = int(overrides[overrides.index("--train_batch_size") + 1]) if "--train_batch_size" in overrides else \
        yaml.safe_load(BASE_CONFIG.read_text())["train_batch_size"]
    steps = math.ceil(epochs * TRAIN_IMAGES / batch)
    return ["--config", str(BASE_CONFIG), "--output_dir", str(output_dir), "--max_train_steps", str(steps),
            "--logger", "none", "--save_images_epochs", "1000", "--checkpointing_steps", "100000", *overrides]


def resolved_config(args: list) -> dict:
    """Get the config the trainer would run with these arguments (its --dry_run), less the incidental keys."""
    result = subprocess.run([sys.executable, str(ROOT / "train_accelerate.py"), *args, "--dry_run"],
                            capture_output=True, text=True, check=True)
    return {k: v for k, v in yaml.safe_load(result.stdout).items() if k not in INCIDENTAL_KEYS}


def finished_run(output_dir: Path, expected: dict):
    """Get (img/s, seconds) of a finished run in output_dir trained with `expected`, or None."""
    log, config_file = output_dir / "train.log", output_dir / "train_config.yaml"
    if not (output_dir / "model_index.json").is_file() or not config_file.is_file() or not log.is_file():
        return None
    saved = with_new_keys_at_defaults(yaml.safe_load(config_file.read_text()))
    saved = {k: v for k, v in saved.items() if k not in INCIDENTAL_KEYS}
    match = DONE_LINE.search(log.read_text())
    return (float(match["img_per_s"]), int(match["seconds"])) if saved == expected and match else None


def launch(name: str, row_args: list) -> subprocess.CompletedProcess:
    """Run the README's command, `accelerate launch train_accelerate.py ...`, with a row's launcher options."""
    accelerate = Path(sys.executable).parent / "accelerate"
    return subprocess.run([str(accelerate), "launch", "--num_processes", "1", *LAUNCH_OPTIONS.get(name, []),
                           str(ROOT / "train_accelerate.py"), *row_args], capture_output=True, text=True)


def train_row(name: str, epochs: float, output_dir: Path):
    """Train a row with the README's launcher (or reuse its finished run); get (img/s, seconds, resolved config)."""
    row_args = trainer_args(name, epochs, output_dir)
    expected = resolved_config(row_args)
    done = finished_run(output_dir, expected)
    if done is None:
        if output_dir.exists():
            raise SystemExit(f"{output_dir} exists but is not a finished run of row {name}; move it away first")
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        command = ["accelerate", "launch", *LAUNCH_OPTIONS.get(name, []), "train_accelerate.py", *row_args]
        print(f"[{name}] training: {' '.join(command)}", flush=True)
        result = launch(name, row_args)
        if result.returncode != 0:
            raise SystemExit(f"row {name} failed ({result.returncode}): {result.stderr[-1500:]}")
        (output_dir / "train.log").write_text(result.stdout + result.stderr[-3000:])
        done = finished_run(output_dir, expected)
    return done[0], done[1], expected


def row_length(name: str, args, speed: dict):
    """Get (epochs, model folder) of a row: --epochs, or in an equal-time study the epochs it trains, alone, in the
    time the --equal_time_to row takes for --epochs."""
    anchor = args.equal_time_to
    if anchor is None or name == anchor:  # the anchor's folder is the equal-images study's, so its run is reused
        return args.epochs, Path(args.workdir) / f"{name}-{args.epochs:g}ep"
    epochs = args.epochs * speed[name]["img_per_s"] / speed[anchor]["img_per_s"]
    return epochs, Path(args.workdir) / f"{name}-time-of-{anchor}-{args.epochs:g}ep"


def score(output_dir: Path, evaluator, args) -> dict:
    """Get FID, class KL, precision and recall of each sampler in SAMPLERS for the pipeline in output_dir."""
    pipe = load_pipeline(str(output_dir), scheduler="diffusers", device="cpu")
    ddpm_config = pipe.scheduler.config
    scores = {}
    for sampler, steps in SAMPLERS:
        pipe.scheduler = build_scheduler(SCHEDULER_OF[sampler], ddpm_config)
        started = time.perf_counter()
        images = generate_images(pipe, args.num_samples, args.batch_size, steps, args.seed, progress=False)
        report = evaluator.evaluate(images)
        scores[f"{sampler}{steps}"] = {"fid": report["fid"], "class_kl": report["class_kl_from_uniform"],
                                       "precision": report["precision"], "recall": report["recall"],
                                       "sampling_seconds": round(time.perf_counter() - started, 1)}
    return scores


def write_json(path, protocol: dict, rows: dict, speed: dict) -> None:
    """Write the study so far, atomically."""
    with atomic_output(Path(path)) as staging:
        staging.write_text(json.dumps({"protocol": protocol, "machine": machine_description(torch.device("cpu")),
                                       "rows": rows, "speed": speed}, indent=2) + "\n")


def time_row(name: str, steps: int, workdir: Path) -> dict:
    """Get a row's img/s (whole run, and after the first step with that step's seconds) from a short run of the
    README's command, in its own output folder, removed after."""
    workdir.mkdir(parents=True, exist_ok=True)
    output_dir = Path(tempfile.mkdtemp(prefix=f".speed-{name}-", dir=workdir)) / "run"  # never a folder we did not make
    row_args = trainer_args(name, 1, output_dir)
    row_args[row_args.index("--max_train_steps") + 1] = str(steps)
    result = launch(name, row_args)
    shutil.rmtree(output_dir.parent, ignore_errors=True)
    match = DONE_LINE.search(result.stdout)
    if result.returncode != 0 or not match or match["first_step"] is None:
        raise SystemExit(f"timing row {name} failed ({result.returncode}): {result.stderr[-1500:]}")
    return {"img_per_s": float(match["img_per_s"]), "img_per_s_after_first_step": float(match["after_first_step"]),
            "first_step_seconds": float(match["first_step"]), "steps": steps}


def markdown_table(study: dict) -> str:
    """Get the README's table of a study: one line per row, FIDs also as multiples of the floor at the same N."""
    floor = study["rows"]["real-train"]["fid"]
    equal_time = "equal_time_to" in study["protocol"]  # rows differ in images: show them, and the seconds they took
    lines = ["| row | what changed |" + (" images | seconds |" if equal_time else "") + " img/s (whole run) | "
             "img/s (alone) | DPM-Solver++ 20: FID (× floor) / class KL | DDIM 50: FID (× floor) / class KL |",
             "|---|---|" + ("---:|---:|" if equal_time else "") + "---:|---:|---:|---:|"]
    for name, row in study["rows"].items():
        if name == "real-train":
            continue
        alone = study.get("speed", {}).get(name, {}).get("img_per_s")
        cells = [f"{row[s]['fid']:.2f} ({row[s]['fid'] / floor:.0f}×) / {row[s]['class_kl']:.3f}"
                 for s in ("dpm20", "ddim50")]
        images = f" {row['images']:,} | {row['train_seconds']} |" if equal_time else ""
        lines.append(f"| `{name}` | {row['changed']} |{images} {row['img_per_s']:.1f} | "
                     f"{'-' if alone is None else f'{alone:.1f}'} | {cells[0]} | {cells[1]} |")
    lines.append(f"| real training images | the floor at N = {study['protocol']['num_samples']} |"
                 + (" | |" if equal_time else "") + f" | | {floor:.3f} / "
                 f"{study['rows']['real-train']['class_kl']:.3f} | |")
    timed = {name: run for name, run in study.get("speed", {}).items() if "first_step_seconds" in run}
    if timed:  # the short timing runs (--speed_steps): the first step apart, as torch.compile compiles in it
        lines += ["",
                  "| row (timing run) | what changed | steps | img/s | img/s after the first step | first step (s) |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| `{name}` | {ROWS[name][0]} | {run['steps']} | {run['img_per_s']:.1f} | "
                  f"{run['img_per_s_after_first_step']:.1f} | {run['first_step_seconds']:.1f} |"
                  for name, run in timed.items()]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(DEFAULT_ROWS))
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=250, help="sampling batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/work/runs/ablation", help="where each row's model folder goes")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "ablation.json"))
    parser.add_argument("--speed_steps", type=int, default=None, help="only time each row with a run this long")
    parser.add_argument("--equal_time_to", choices=list(ROWS), default=None,
                        help="train each row for the time this row takes for --epochs, not for equal images: its "
                             f"images are scaled by its img/s over this row's, both timed alone ({TIMING_STEPS} steps)")
    parser.add_argument("--table", action="store_true", help="only print the --json study as a Markdown table")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.json).read_text())))
        return

    protocol = {"base_config": "cpu.yaml", "epochs": args.epochs, "num_samples": args.num_samples,
                "seed": args.seed, "sampling_batch_size": args.batch_size, "features": "fmnist", "reference": "test",
                "samplers": [f"{s}{n}" for s, n in SAMPLERS]}
    if args.equal_time_to:
        protocol.update(equal_time_to=args.equal_time_to, timing_steps=TIMING_STEPS)
    try:
        saved = continue_study(args.json, protocol)
    except ValueError as error:  # one line, no usage: the options were valid
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    rows, speed = saved.get("rows", {}), saved.get("speed", {})
    if args.speed_steps:
        for name in args.rows:
            speed[name] = time_row(name, args.speed_steps, Path(args.workdir))
            print(f"[{name}] {speed[name]['img_per_s']:.1f} img/s over {args.speed_steps} steps, "
                  f"{speed[name]['img_per_s_after_first_step']:.1f} after the first step "
                  f"({speed[name]['first_step_seconds']:.1f} s)", flush=True)
            write_json(args.json, protocol, rows, speed)
        return
    if args.equal_time_to:  # time every row first, while the machine is idle; a continued study keeps its times
        for name in dict.fromkeys([args.equal_time_to, *args.rows]):
            if name not in speed:
                speed[name] = time_row(name, TIMING_STEPS, Path(args.workdir))
                print(f"[{name}] {speed[name]['img_per_s']:.1f} img/s alone", flush=True)
                write_json(args.json, protocol, rows, speed)
    evaluator = Evaluator("fmnist", "test", None, args.batch_size)
    if "real-train" not in rows:
        report = evaluator.evaluate(real_training_images(args.num_samples, args.seed))
        rows["real-train"] = {"changed": "real training images (the floor)", "fid": report["fid"],
                              "class_kl": report["class_kl_from_uniform"]}
        write_json(args.json, protocol, rows, speed)
    print(f"floor at N = {args.num_samples}: FID {rows['real-train']['fid']:.3f}", flush=True)
    for name in args.rows:
        if name in rows:
            print(f"[{name}] kept from {args.json}", flush=True)
            continue
        epochs, output_dir = row_length(name, args, speed)
        images_per_second, seconds, config = train_row(name, epochs, output_dir)
        scores = score(output_dir, evaluator, args)
        rows[name] = {"changed": ROWS[name][0], "overrides": ROWS[name][1], "images": round(epochs * TRAIN_IMAGES),
                      "max_train_steps": config["max_train_steps"], "img_per_s": images_per_second,
                      "train_seconds": seconds, **scores}
        write_json(args.json, protocol, rows, speed)
        print(f"[{name}] {images_per_second:.1f} img/s; " + "; ".join(
            f"{k}: FID {v['fid']:.2f}, KL {v['class_kl']:.3f}" for k, v in scores.items()), flush=True)


if __name__ == "__main__":
    main()
