"""DDIM sample quality against its number of steps, per scheduler setting: which setting makes FID rise with steps?

    python benchmarks/ddim_steps.py --model out-cpu [--settings clip_sample=false,final_x0_from=40 noclip ...]
        [--steps 25 50 100] [--num_samples 1000] [--batch_size 250] [--seed 0] [--floor]
        [--json benchmarks/results/ddim_steps.json]

For every (setting, steps) pair it samples N images from a saved DDPMPipeline with diffusers' DDIMScheduler built
from the pipeline's own (DDPM) scheduler config plus the setting's overrides, exactly as
`DDIMScheduler.from_config(config, **overrides)`, and scores them with the project's Evaluator (FID, precision,
recall, class histogram and its KL from uniform against the FashionMNIST test set, `fmnist` features by default).
Sampling is ddpm_fashion.sampling.generate.generate_images: batching and seeding are those of `ddpm-fashion evaluate`:
the `inherited` row at S steps is `ddpm-fashion evaluate --model M --scheduler ddim-from-config
--num_inference_steps S` with the same --num_samples, --batch_size and --seed. Every row starts from the same
initial noise x_T (one generator seeded with --seed; deterministic samplers draw nothing else, and eta > 0 draws its
noise from a second generator).

A setting is a preset name (see SETTINGS) or `key=value,key=value` over DDIMScheduler's config keys plus the step
options `eta`, `use_clipped_model_output` and `final_x0_from` (end the walk there with x_0_hat, STEP_OPTIONS);
`sampler=dpm` gives DPM-Solver++ (the project's `--scheduler dpm`). Each row also records the share of black and
near-black pixels of its images (FashionMNIST's background is exactly black; benchmarks/dark_pixels.py).
For DDIM rows the JSON also records what clipping x_0_hat to [-1, 1] changes along the row's own trajectory
(applied when clip_sample=True, hypothetical otherwise): `clipped_share`, the mean share of x_0_hat pixels outside
[-1, 1] per step, and `clip_shift_total`, the sum over steps of the RMS of clip(x_0_hat) - x_0_hat. With
clip_sample=True and eps not re-derived from the clipped x_0_hat (diffusers' default), each step moves
x_t / sqrt(alpha_bar_t) by exactly that difference, whatever the step size, so the total grows with the steps.
`--floor` adds the real-training-images row (`ddpm-fashion evaluate --model real-train`) at the same N.

Rows already in --json with the same protocol (model files, N, seed, batch size, features) are kept and not
re-run, and the file is rewritten after every row, so a long study can be stopped and continued. A --json made
under another protocol (another model, say) is refused, naming what differs, rather than replaced.
"""

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ddpm_fashion.evaluation.features import FEATURE_CHOICES  # noqa: E402
from ddpm_fashion.evaluation.metrics import pixel_shares  # noqa: E402
from ddpm_fashion.evaluation.sample_quality import REAL_TRAIN, Evaluator, machine_description, real_training_images  # noqa: E402
from ddpm_fashion.guards.files import atomic_output  # noqa: E402
from ddpm_fashion.sampling.generate import generate_images, predicted_original  # noqa: E402
from ddpm_fashion.sampling.pictures import to_uint8_images  # noqa: E402
from ddpm_fashion.sampling.samples_file import pipeline_fingerprint  # noqa: E402
from ddpm_fashion.sampling.saved_pipeline import build_scheduler, load_pipeline  # noqa: E402
from ddpm_fashion.schedulers.ddim import FINAL_TIMESTEP, EndingDDIMScheduler  # noqa: E402
from studies import continue_study  # noqa: E402

# Presets. `inherited` is what DDIMScheduler.from_config(pipe.scheduler.config) gives for a DDPM config:
# clip_sample=True (the DDPM config's), timestep_spacing="leading", set_alpha_to_one=True, steps_offset=0, eta 0.
SETTINGS = {
    "inherited": {},
    "clip-trailing": {"timestep_spacing": "trailing"},
    "clip-clipped-eps": {"use_clipped_model_output": True},
    "noclip": {"clip_sample": False},
    "noclip-trailing": {"clip_sample": False, "timestep_spacing": "trailing"},
    "noclip-linspace": {"clip_sample": False, "timestep_spacing": "linspace"},
    "noclip-trailing-alpha0": {"clip_sample": False, "timestep_spacing": "trailing", "set_alpha_to_one": False},
    "noclip-leading-alpha0": {"clip_sample": False, "set_alpha_to_one": False},
    "dpm": {"sampler": "dpm"},
}
# `--scheduler ddim` (no clipping, the walk ended at t = FINAL_TIMESTEP), ddim-to-t0 (`noclip`), and
# DDIMScheduler.from_config (`ddim-from-config`).
DEFAULT_SETTINGS = (f"clip_sample=false,final_x0_from={FINAL_TIMESTEP}", "noclip", "inherited")
DEFAULT_STEPS = (25, 50, 100)
# Step options, beside DDIMScheduler's config keys. `final_x0_from=K` ends the walk at the first timestep >= K and
# returns that step's x_0_hat (ddpm_fashion.EndingDDIMScheduler, what `--scheduler ddim` runs with K = FINAL_TIMESTEP):
# steps below K, where the U-Net is least accurate (benchmarks/dark_pixels.py), are skipped whatever the step count.
STEP_OPTIONS = ("eta", "use_clipped_model_output", "final_x0_from")
ROW_KEYS = ("fid", "precision", "recall", "class_kl_from_uniform", "class_histogram")


def parse_value(text: str):
    """Get a setting's value from its text: true/false, an int, a float, or the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_setting(spec: str) -> dict:
    """Get {key: value} of a preset name or a `key=value,key=value` spec, checking the keys."""
    if spec in SETTINGS:
        options = dict(SETTINGS[spec])
    else:
        options = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"setting {spec!r} is neither a preset ({', '.join(SETTINGS)}) nor key=value pairs")
            options[key.strip()] = parse_value(value.strip())
    if options.get("sampler", "ddim") not in ("ddim", "dpm"):
        raise ValueError(f"setting {spec!r}: sampler must be ddim or dpm")
    if options.get("sampler") != "dpm":
        known = set(inspect.signature(DDIMScheduler.__init__).parameters) - {"self"} | set(STEP_OPTIONS) | {"sampler"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"setting {spec!r}: {', '.join(unknown)} are not DDIMScheduler options")
    return options


def make_scheduler(base_config, options: dict, seed: int, diagnostics: dict):
    """Get the scheduler of a setting, its step() bound to the setting's eta/use_clipped_model_output."""
    options = dict(options)
    if options.pop("sampler", "ddim") == "dpm":
        return build_scheduler("dpm", base_config)
    step_options = {key: options.pop(key) for key in STEP_OPTIONS if key in options}
    scheduler = EndingDDIMScheduler.from_config(base_config, **options)
    scheduler.final_timestep = step_options.get("final_x0_from", 0)  # 0: DDIMScheduler, step for step
    original_step = scheduler.step
    eta = step_options.get("eta", 0.0)
    # eta > 0 draws its noise from its own generator, so x_T of every batch is the same as in deterministic rows.
    noise_generator = torch.Generator("cpu").manual_seed(seed + 1) if eta > 0 else None

    def step(model_output, timestep, sample, generator=None, **kwargs):
        output = original_step(model_output, timestep, sample, eta=eta, generator=noise_generator,
                               use_clipped_model_output=step_options.get("use_clipped_model_output", False), **kwargs)
        # What clipping to [-1, 1] changes in this step's x0_hat (applied or not, on this row's own trajectory).
        unclipped = predicted_original(scheduler, model_output, timestep, sample)
        limit = scheduler.config.clip_sample_range
        shift = unclipped.clamp(-limit, limit) - unclipped
        diagnostics["shift_sum"] += shift.pow(2).mean().sqrt().item() * len(sample)
        diagnostics["clipped_sum"] += (shift != 0).float().mean().item() * len(sample)
        diagnostics["image_steps"] += len(sample)
        return output

    scheduler.step = step
    return scheduler


def describe_timesteps(scheduler, steps: int) -> dict:
    """Get the first and last timesteps a scheduler walks, and the alpha_bar it ends on (DDIM only)."""
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    described = {"first_timestep": timesteps[0], "last_timestep": timesteps[-1], "model_calls": len(timesteps)}
    if isinstance(scheduler, DDIMScheduler):
        described["final_alpha_cumprod"] = float(scheduler.final_alpha_cumprod)
        # DDIM steps from t to t - T // steps, which is the next timestep only when the spacing is that integer.
        stride = scheduler.config.num_train_timesteps // steps
        mismatched = sum(1 for t, nxt in zip(timesteps, timesteps[1:]) if t - stride != nxt)
        described["steps_landing_off_schedule"] = mismatched
    return described


def protocol_of(args) -> dict:
    """Get what every row of one JSON shares; rows are reused only under the same protocol."""
    return {"model": str(args.model), "model_sha256": pipeline_fingerprint(args.model) if args.model else None,
            "num_samples": args.num_samples, "seed": args.seed, "batch_size": args.batch_size,
            "features": args.features, "reference": "test"}


def write_json(path, protocol: dict, rows: list) -> None:
    """Write the study so far, atomically (a stopped run leaves the last complete file)."""
    if not path:
        return
    with atomic_output(Path(path)) as staging:
        staging.write_text(json.dumps({"protocol": protocol, "machine": machine_description(torch.device("cpu")),
                                       "rows": rows}, indent=2) + "\n")


def format_row(row: dict) -> str:
    """Get one line of the printed table."""
    def number(key, width, digits):
        value = row.get(key)
        return f"{value:{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
    steps = "-" if row["steps"] is None else str(row["steps"])
    return (f"{row['setting']:26} {steps:>5} {number('fid', 8, 3)} {number('precision', 9, 3)} "
            f"{number('recall', 7, 3)} {number('class_kl_from_uniform', 9, 4)} {number('clipped_share', 8, 4)} "
            f"{number('clip_shift_total', 10, 1)} {number('black_share', 6, 3)} {number('seconds', 8, 1)}")


HEADER = (f"{'setting':26} {'steps':>5} {'FID':>8} {'precision':>9} {'recall':>7} {'class KL':>9} {'clipped':>8} "
          f"{'clip shift':>10} {'black':>6} {'seconds':>8}")


def run_row(pipe, base_config, evaluator, spec: str, steps: int, args) -> dict:
    """Sample and score one (setting, steps) pair."""
    options = parse_setting(spec)
    diagnostics = {"shift_sum": 0.0, "clipped_sum": 0.0, "image_steps": 0}
    pipe.scheduler = make_scheduler(base_config, options, args.seed, diagnostics)
    described = describe_timesteps(make_scheduler(base_config, options, args.seed, {}), steps)
    started = time.perf_counter()
    images = generate_images(pipe, args.num_samples, args.batch_size, steps, args.seed, progress=args.progress)
    seconds = time.perf_counter() - started
    report = evaluator.evaluate(images)
    row = {"setting": spec, "options": options, "steps": steps, **{key: report[key] for key in ROW_KEYS},
           **pixel_shares(to_uint8_images(images)), "seconds": round(seconds, 1), **described}
    if options.get("sampler") != "dpm" and diagnostics["image_steps"]:
        row["clipped_share"] = diagnostics["clipped_sum"] / diagnostics["image_steps"]
        row["clip_shift_total"] = diagnostics["shift_sum"] / args.num_samples  # summed over the steps, per image
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder of a saved DDPMPipeline")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                        help=f"presets ({', '.join(SETTINGS)}) or key=value,key=value DDIMScheduler overrides")
    parser.add_argument("--steps", nargs="+", type=int, default=list(DEFAULT_STEPS))
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", choices=FEATURE_CHOICES, default="fmnist")
    parser.add_argument("--floor", action="store_true", help=f"add the {REAL_TRAIN} row at the same N")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--json", default=None, help="write (and continue) the rows in this JSON file")
    parser.add_argument("--progress", action="store_true", help="show a sampling progress bar")
    args = parser.parse_args(argv)
    for spec in args.settings:
        parse_setting(spec)  # fail on a typo before minutes of sampling

    protocol = protocol_of(args)
    try:
        rows = continue_study(args.json, protocol).get("rows", [])
    except ValueError as error:  # one line, no usage: the options were valid
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    done = {(row["setting"], row["steps"]) for row in rows}
    pipe = load_pipeline(args.model, scheduler="diffusers", device="cpu")
    base_config = pipe.scheduler.config  # the saved DDPM config: what from_config inherits
    evaluator = Evaluator(args.features, "test", args.data_dir, args.batch_size)
    print(f"{args.model}: N = {args.num_samples}, seed {args.seed}, batch {args.batch_size}, {args.features} features "
          f"vs the {len(evaluator.reference)} test images; {machine_description(torch.device('cpu'))}")
    print(HEADER)
    for row in rows:
        print(format_row(row) + "   (from " + str(args.json) + ")")
    if args.floor and (REAL_TRAIN, None) not in done:
        started = time.perf_counter()
        report = evaluator.evaluate(real_training_images(args.num_samples, args.seed, args.data_dir))
        rows.append({"setting": REAL_TRAIN, "options": {}, "steps": None,
                     **{key: report[key] for key in ROW_KEYS}, "seconds": round(time.perf_counter() - started, 1)})
        print(format_row(rows[-1]), flush=True)
        write_json(args.json, protocol, rows)
    for spec in args.settings:
        for steps in args.steps:
            if (spec, steps) in done:
                continue
            rows.append(run_row(pipe, base_config, evaluator, spec, steps, args))
            print(format_row(rows[-1]), flush=True)
            write_json(args.json, protocol, rows)
    return rows


if __name__ == "__main__":
    main()
