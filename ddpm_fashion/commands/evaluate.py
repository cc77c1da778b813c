"""`ddpm-fashion evaluate`: FID, precision/recall and class balance of a model's samples against the test set."""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ddpm_fashion.commands.options import (
    add_device_option,
    add_scheduler_option,
    add_seed_option,
    check_free_space,
    check_new_output,
    model_folder_entries,
    protected_outputs,
    write_error,
    writing,
)
from ddpm_fashion.evaluation.features import DEFAULT_BATCH_SIZE, FEATURE_CHOICES, INCEPTION_FILE
from ddpm_fashion.evaluation.sample_quality import DEFAULT_NUM_SAMPLES, MIN_SAMPLES, REAL_TRAIN
from ddpm_fashion.guards.files import check_output_path, is_disk_full
from ddpm_fashion.guards.inputs import positive_int

# Float copies of all generated images held at once: the images, and the concatenation handed to the samples file.
IMAGE_COPIES = 2
# The most a samples file's header (safetensors' tensor table and our metadata) takes.
SAMPLES_HEADER_BYTES = 64 * 1024


def open_samples_file(args: argparse.Namespace, pipe, num_inference_steps: int, device: torch.device):
    """Get the --samples_file of this run, refusing one made with other settings (before any slow set-up)."""
    from ddpm_fashion.evaluation.sample_quality import machine_description
    from ddpm_fashion.sampling.generate import sample_shape
    from ddpm_fashion.sampling.samples_file import SamplesFile, pipeline_fingerprint
    from ddpm_fashion.sampling.saved_pipeline import sampler_settings

    settings = {"model_sha256": pipeline_fingerprint(args.model), **sampler_settings(args.scheduler, pipe.scheduler),
                "num_inference_steps": num_inference_steps, "seed": args.seed, "batch_size": args.batch_size,
                "device": device.type}
    return SamplesFile(Path(args.samples_file), settings, args.num_samples, args.batch_size,
                       machine_description(device), sample_shape(pipe))


def generate_for_evaluation(pipe, args: argparse.Namespace, num_inference_steps: int, device: torch.device,
                            samples_file=None):
    """Get generated images [N, 1, H, W] and the timing fields of the report, continuing samples_file if given."""
    from ddpm_fashion.evaluation.sample_quality import machine_description
    from ddpm_fashion.sampling import generate

    saved = samples_file.saved if samples_file is not None else None
    seconds = samples_file.seconds_before if samples_file is not None else 0.0
    machine = samples_file.machine if samples_file is not None else machine_description(device)
    if saved is not None and len(saved["images"]) >= args.num_samples:
        images, generated = saved["images"][:args.num_samples], len(saved["images"])
    else:
        if saved is not None:
            print(f"continuing from {len(saved['images'])} images in {samples_file.path}", file=sys.stderr)
        resume = (saved["images"], saved["generator_state"]) if saved is not None else None
        started = samples_file.start_clock() if samples_file is not None else time.perf_counter()
        images = generate.generate_images(pipe, args.num_samples, args.batch_size, num_inference_steps, args.seed,
                                          resume=resume, on_batch=_naming_the_file(samples_file))
        seconds += time.perf_counter() - started
        generated = args.num_samples
    # Seconds are summed over every run that added to the samples, per image they made.
    return images, {"sampling_seconds": round(seconds, 2),
                    "seconds_per_1000_images": round(1000 * seconds / generated, 2), "machine": machine}


def samples_file_bytes(num_images: int, image_shape) -> int:
    """Get an upper bound of the size of a samples file of num_images images: the float32 images, the generator's
    state and the header (settings and machine, far below SAMPLES_HEADER_BYTES)."""
    if num_images == 0:
        return 0
    state_bytes = torch.Generator("cpu").get_state().numel()
    return num_images * math.prod(image_shape) * 4 + state_bytes + SAMPLES_HEADER_BYTES


def samples_file_growth(samples_file, num_samples: int, batch_size: int, image_shape) -> int:
    """Get the most disk space a run adds while it saves samples_file after every batch.

    Each save writes the whole file beside the previous one, which is removed only once the new one is in place:
    the last save holds both the file of all but the last batch and the file of all images.
    """
    saved = len(samples_file.saved["images"]) if samples_file.saved is not None else 0
    if saved >= num_samples:
        return 0  # the images are there: nothing is written
    last_batch = num_samples % batch_size or batch_size
    before_last = samples_file_bytes(max(num_samples - last_batch, saved), image_shape)
    on_disk = os.path.getsize(samples_file.path) if samples_file.path.exists() else 0
    return samples_file_bytes(num_samples, image_shape) + before_last - on_disk


def _naming_the_file(samples_file):
    """Get samples_file as an on_batch callback whose failed saves are one line naming the file (None: None)."""
    if samples_file is None:
        return None

    def save(images, generator) -> None:
        try:
            samples_file(images, generator)
        except Exception as error:  # OSError, or safetensors' SafetensorError (no OSError) on a full disk
            if not (isinstance(error, OSError) or is_disk_full(error)):
                raise
            raise ValueError(write_error(samples_file.path, error, "--samples_file") + "; it keeps the images "
                             "saved before, so rerun the same command to continue") from None

    return save


def run(args: argparse.Namespace) -> int:
    """Generate (or take real training) images, score them against the test set, print and save the report."""
    from ddpm_fashion.evaluation.sample_quality import Evaluator, format_report, real_training_images
    from ddpm_fashion.sampling import generate
    from ddpm_fashion.sampling.saved_pipeline import load_pipeline, resolve_device, sampler_settings

    generated = args.model != REAL_TRAIN
    model = args.model if generated else None
    report_path = check_new_output(args.json, (".json",), model) if args.json else None
    if args.samples_file:
        if not generated:
            raise ValueError(f"--samples_file keeps generated images; --model {REAL_TRAIN} generates none")
        # The one output that may exist: a samples file of this very command is continued, any other is refused.
        check_output_path(args.samples_file, (".safetensors",), protected_outputs(model), model_folder_entries)
    if args.num_samples < MIN_SAMPLES:
        raise ValueError(f"--num_samples must be at least {MIN_SAMPLES}, got {args.num_samples}")
    device = resolve_device(args.device)
    protocol = {"model": args.model, "seed": args.seed, "sampler": None, "num_inference_steps": None}
    pipe: Optional[object] = None
    samples_file = None
    if generated:
        pipe = load_pipeline(args.model, scheduler=args.scheduler, device=device)
        steps = generate.inference_steps(pipe, args.scheduler, args.num_inference_steps)
        generate.check_sampling_memory(pipe, min(args.batch_size, args.num_samples), args.num_samples,
                                       "--batch_size", "--num_samples", IMAGE_COPIES)
        protocol.update(**sampler_settings(args.scheduler, pipe.scheduler), num_inference_steps=steps)
        samples_file = open_samples_file(args, pipe, steps, device) if args.samples_file else None
        if samples_file is not None:
            check_free_space([(samples_file.path, samples_file_growth(samples_file, args.num_samples, args.batch_size,
                                                                      generate.sample_shape(pipe)))])
    else:
        images = real_training_images(args.num_samples, args.seed, args.data_dir)
    # Everything that can fail fast (features, weights, reference data) is set up before minutes of sampling.
    evaluator = Evaluator(args.features, "test", args.data_dir, args.batch_size, args.inception_weights, device)
    if pipe is not None:
        images, timing = generate_for_evaluation(pipe, args, protocol["num_inference_steps"], device, samples_file)
        protocol.update(timing)
    report = {**protocol, **evaluator.evaluate(images)}
    print(format_report(report))
    if report_path:
        with writing(report_path) as staging:
            staging.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote the report to {report_path}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `evaluate` subcommand."""
    parser = subparsers.add_parser("evaluate", help="FID, precision/recall and class balance against the test set")
    parser.add_argument("--model", required=True,
                        help=f"folder of a saved DDPMPipeline, or {REAL_TRAIN} to score real training images "
                             f"(the floor every table shows)")
    parser.add_argument("--num_samples", type=positive_int, default=DEFAULT_NUM_SAMPLES)
    add_scheduler_option(parser)
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="sampling steps (default: all training steps for DDPM, 50 for ddim, 25 for dpm)")
    parser.add_argument("--features", choices=FEATURE_CHOICES, default="fmnist",
                        help="fmnist: the shipped FashionMNIST classifier (offline); inception: standard FID "
                             "InceptionV3")
    parser.add_argument("--inception_weights", default=None,
                        help=f"local FID InceptionV3 weights ({INCEPTION_FILE} or a .safetensors copy), for "
                             f"machines without internet")
    parser.add_argument("--batch_size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                        help="images per batch, for sampling and for features")
    add_seed_option(parser, "seed of the sampler, or of the choice of real images")
    parser.add_argument("--json", default=None, help="write the report as JSON here (a new file)")
    parser.add_argument("--samples_file", default=None,
                        help="keep the generated images in this .safetensors file after every batch; rerunning the "
                             "same command continues an interrupted run where it stopped, with identical results")
    parser.add_argument("--data_dir", default=None, help="folder with the FashionMNIST IDX .gz files")
    add_device_option(parser)
    parser.set_defaults(func=run, memory_option="--batch_size")
    return parser
