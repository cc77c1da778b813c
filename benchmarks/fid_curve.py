"""FID against training images seen: the EMA weights of a run's checkpoints, each scored like `ddpm-fashion evaluate`.

    python benchmarks/fid_curve.py --run out-cpu --checkpoints DIR [DIR ...] --label NAME
        [--scheduler dpm] [--num_inference_steps 20] [--num_samples 1000] [--batch_size 250] [--seed 0]
        [--weights published|raw] [--json benchmarks/results/fid_curve.json]
    python benchmarks/fid_curve.py --table [--json ...]         # the README's table of every curve in --json

Both end with each curve's power-law trend (a least-squares line through log FID against log images) and the
images at which that trend would reach 10x the floor: an extrapolation, to size a run, not a result.

A run keeps only its last `checkpoints_total_limit` checkpoints, so to draw a curve copy each one aside as it is
written (or train with a larger limit) and pass the copies; a checkpoint folder or a folder of them is accepted.
Each point is the run's published DDPMPipeline (`--run`: its U-Net config and scheduler) with the checkpoint's
weights swapped in: by default the ones the run publishes (`--weights published`: the EMA weights, ema.safetensors,
stored in the order of the trainer's model.parameters(), or for a run without EMA the raw ones), or the optimizer's
own (`--weights raw`: model.safetensors), which tells what the EMA bought. It samples N images with the chosen
scheduler exactly as `ddpm-fashion evaluate --model RUN --scheduler S --num_inference_steps K` samples the finished
run, and scores them with the project's Evaluator (FID over `fmnist` features, class KL from uniform,
precision/recall) against the FashionMNIST test set, beside the real-training-images floor at the same N.

A checkpoint in the middle of a run is not the model a run of that length would give: its learning rate has not
decayed yet, so early points are pessimistic. Points already in --json under the same label and protocol are kept,
and the file is rewritten after every point, so a long curve can be stopped and continued; a label whose saved
protocol differs is refused (exit 2, naming what differs) rather than replaced.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ddpm_fashion.evaluation.sample_quality import Evaluator, machine_description, real_training_images  # noqa: E402
from ddpm_fashion.guards.files import atomic_output, check_output_path, read_json_object  # noqa: E402
from ddpm_fashion.models.unet import load_strict  # noqa: E402
from ddpm_fashion.sampling.generate import generate_images, inference_steps  # noqa: E402
from ddpm_fashion.sampling.saved_pipeline import SCHEDULER_CHOICES, build_scheduler, load_pipeline  # noqa: E402
from ddpm_fashion.training.checkpointing import EMA_WEIGHTS  # noqa: E402
from ddpm_fashion.training.run_dir import TRAINER_STATE  # noqa: E402
from studies import check_same_protocol  # noqa: E402

RAW_WEIGHTS = "model.safetensors"  # accelerate.save_state's file for the (only) prepared model
TRAIN_CONFIG = "train_config.yaml"
WEIGHTS_CHOICES = ("published", "raw")


def checkpoint_folders(paths) -> list:
    """Get the checkpoint folders named by paths (each a checkpoint, or a folder of checkpoint-N), by step."""
    found = []
    for path in map(Path, paths):
        if (path / TRAINER_STATE).is_file():
            found.append(path)
        elif path.is_dir() and any((child / TRAINER_STATE).is_file() for child in path.iterdir()):
            found.extend(child for child in path.iterdir() if (child / TRAINER_STATE).is_file())
        else:
            raise SystemExit(f"{path} is neither a checkpoint (it has no {TRAINER_STATE}) nor a folder of them")
    return sorted(set(found), key=lambda folder: json.loads((folder / TRAINER_STATE).read_text())["global_step"])


def images_seen(checkpoint: Path) -> tuple:
    """Get (optimizer steps, training images seen) at a checkpoint."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    step = state["global_step"]
    if "images_seen" in state:
        return step, state["images_seen"]
    # Checkpoints from before images were counted: every batch was full (what load_checkpoint assumes too).
    config = yaml.safe_load((checkpoint / TRAIN_CONFIG).read_text())
    return step, step * config["train_batch_size"] * config.get("gradient_accumulation_steps", 1)


def pipeline_at(run: str, checkpoint: Path, weights: str = "published"):
    """Get the run's DDPMPipeline (UNet2DModel, diffusers' DDPM scheduler) with a checkpoint's EMA or raw weights.

    weights "published" takes the EMA weights where the run kept an EMA (what its pipeline publishes), "raw" always
    the optimizer's own.
    """
    pipe = load_pipeline(run, scheduler="diffusers", unet="own", device="cpu")
    run_unet = yaml.safe_load((Path(run) / TRAIN_CONFIG).read_text())["unet"]
    if yaml.safe_load((checkpoint / TRAIN_CONFIG).read_text())["unet"] != run_unet:
        raise SystemExit(f"{checkpoint} is not a checkpoint of {run}: its U-Net config differs")
    parameters = list(pipe.unet.parameters())
    if weights == "published" and (checkpoint / EMA_WEIGHTS).is_file():
        shadow = load_file(checkpoint / EMA_WEIGHTS)
        if len(shadow) != len(parameters):
            raise SystemExit(f"{checkpoint / EMA_WEIGHTS} holds {len(shadow)} tensors, the U-Net has {len(parameters)}")
        with torch.no_grad():
            for index, parameter in enumerate(parameters):
                parameter.copy_(shadow[str(index)])  # copy_ refuses a wrong shape
    else:
        load_strict(pipe.unet, load_file(checkpoint / RAW_WEIGHTS))
    pipe.unet = pipe.unet.to_diffusers().eval()  # sample with the library's U-Net, as `evaluate` does by default
    return pipe


def score(pipe, evaluator, args, steps: int) -> dict:
    """Get FID, class KL, precision, recall and sampling time of N images from pipe with the chosen scheduler."""
    pipe.scheduler = build_scheduler(args.scheduler, pipe.scheduler.config)
    started = time.perf_counter()
    images = generate_images(pipe, args.num_samples, args.batch_size, steps, args.seed, progress=False)
    seconds = time.perf_counter() - started
    report = evaluator.evaluate(images)
    return {"fid": report["fid"], "class_kl": report["class_kl_from_uniform"], "precision": report["precision"],
            "recall": report["recall"], "sampling_seconds": round(seconds, 1)}


def saved_curves(path: Path) -> dict:
    """Get the curves saved at path to continue ({} of each if none), or a one-line ValueError if it is not ours."""
    check_output_path(str(path), (".json",))  # before any sampling: it is rewritten after every point
    if not path.is_file():
        return {"curves": {}, "floors": {}}
    study = read_json_object(path)
    if not (isinstance(study.get("curves"), dict) and isinstance(study.get("floors"), dict)):
        raise ValueError(f"{path} holds results this command did not write; give another --json")
    return study


def write_json(path: Path, study: dict) -> None:
    """Write the curves so far, atomically."""
    with atomic_output(path) as staging:
        staging.write_text(json.dumps(study, indent=2) + "\n")


def markdown_table(study: dict) -> str:
    """Get the README's table: one line per point, FID also as a multiple of the floor at the same N."""
    lines = ["| recipe | steps | images seen | FID (× floor) | class KL | precision | recall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, curve in study["curves"].items():
        floor = study["floors"][str(curve["protocol"]["num_samples"])]["fid"]
        for point in sorted(curve["points"].values(), key=lambda point: point["images_seen"]):
            lines.append(f"| {label} | {point['step']} | {point['images_seen']:,} | {point['fid']:.2f} "
                         f"({point['fid'] / floor:.0f}×) | {point['class_kl']:.3f} | {point['precision']:.3f} | "
                         f"{point['recall']:.3f} |")
    for n, floor in sorted(study["floors"].items(), key=lambda item: int(item[0])):
        lines.append(f"| real training images (floor, N = {n}) | | | {floor['fid']:.3f} | {floor['class_kl']:.3f} | "
                     f"{floor['precision']:.3f} | {floor['recall']:.3f} |")
    return "\n".join(lines)


def images_for_fid(points: list, target_fid: float) -> tuple:
    """Get (exponent k, images where FID reaches target_fid) of a power law FID = c * images^-k fitted to points.

    A least-squares line through (log images, log FID); it extrapolates, so it is a trend, not a prediction.
    """
    xs = [math.log(point["images_seen"]) for point in points]
    ys = [math.log(point["fid"]) for point in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    if slope >= 0:
        return -slope, math.inf  # FID does not fall with images: the target is never reached on this trend
    intercept = mean_y - slope * mean_x
    return -slope, math.exp((math.log(target_fid) - intercept) / slope)


def trend_lines(study: dict, times_floor: float = 10.0) -> list:
    """Get one line per curve: its power-law fit and the images it would need for FID at times_floor x the floor."""
    lines = []
    for label, curve in study["curves"].items():
        points = list(curve["points"].values())
        if len(points) < 2:
            continue
        floor = study["floors"][str(curve["protocol"]["num_samples"])]["fid"]
        exponent, images = images_for_fid(points, times_floor * floor)
        lines.append(f"{label}: FID ~ images^-{exponent:.2f} over {len(points)} points; {times_floor:g}x the floor "
                     f"(FID {times_floor * floor:.3f}) at ~{images:,.0f} images ({images / 60_000:,.0f} epochs)")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="the finished run folder (a saved DDPMPipeline with its train_config.yaml)")
    parser.add_argument("--checkpoints", nargs="+", help="checkpoint folders, or folders of them")
    parser.add_argument("--label", help="the curve's name in --json, e.g. the recipe")
    parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default="dpm")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=250, help="sampling batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=WEIGHTS_CHOICES, default="published",
                        help="published: the EMA weights where the run kept an EMA; raw: the optimizer's weights")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fid_curve.json"))
    parser.add_argument("--table", action="store_true", help="only print the --json curves as a Markdown table")
    args = parser.parse_args(argv)
    json_path = Path(args.json)
    if args.table:
        try:
            study = read_json_object(json_path)
        except ValueError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        print("\n".join([markdown_table(study), *trend_lines(study)]))
        return
    if not (args.run and args.checkpoints and args.label):
        parser.error("--run, --checkpoints and --label are required unless --table is given")
    checkpoints = checkpoint_folders(args.checkpoints)
    protocol = {"run": str(args.run), "scheduler": args.scheduler, "num_inference_steps": args.num_inference_steps,
                "num_samples": args.num_samples, "batch_size": args.batch_size, "seed": args.seed,
                "weights": args.weights, "features": "fmnist", "reference": "FashionMNIST test set",
                "run_config": yaml.safe_load((Path(args.run) / TRAIN_CONFIG).read_text())}
    try:
        study = saved_curves(json_path)
        curve = study["curves"].setdefault(args.label, {"protocol": protocol, "points": {}})
        check_same_protocol(json_path, curve, protocol)
    except ValueError as error:  # one line, no usage: the options were valid
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    study["machine"] = machine_description(torch.device("cpu"))
    evaluator = Evaluator(features="fmnist")
    if str(args.num_samples) not in study["floors"]:
        report = evaluator.evaluate(real_training_images(args.num_samples, args.seed))
        study["floors"][str(args.num_samples)] = {"fid": report["fid"], "class_kl": report["class_kl_from_uniform"],
                                                  "precision": report["precision"], "recall": report["recall"]}
        write_json(json_path, study)
    for checkpoint in checkpoints:
        if checkpoint.name in curve["points"]:
            continue
        step, seen = images_seen(checkpoint)
        pipe = pipeline_at(args.run, checkpoint, args.weights)
        point = {"step": step, "images_seen": seen,
                 **score(pipe, evaluator, args, inference_steps(pipe, args.scheduler, args.num_inference_steps))}
        curve["points"][checkpoint.name] = point
        print(f"[{args.label}] {checkpoint.name}: {seen:,} images, FID {point['fid']:.3f}, "
              f"class KL {point['class_kl']:.3f}", flush=True)
        write_json(json_path, study)
    print("\n".join([markdown_table(study), *trend_lines(study)]))


if __name__ == "__main__":
    main()
