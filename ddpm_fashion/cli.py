"""The `ddpm-fashion` command line (also `python -m ddpm_fashion`): argument parsing and dispatch.

Every subcommand gets the parsed arguments, checks its inputs and output paths before any work, and raises
ValueError / OSError with a one-line message on bad input; `main` prints that as
`ddpm-fashion <subcommand>: error: <message>` and returns exit code 2, with no traceback and nothing written.
Files are written under a temporary name in the target folder and renamed into place, so none is ever half-written.
"""

import argparse
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

PROG = "ddpm-fashion"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def one_line(error: BaseException) -> str:
    """Get an exception's message on a single line."""
    return " ".join(str(error).split()) or type(error).__name__


def check_output_path(path: str, suffixes: Iterable[str]) -> Path:
    """Get an output file path, or raise a one-line ValueError unless it can be written as one of `suffixes`."""
    suffixes = tuple(suffixes)
    target = Path(path)
    if target.suffix.lower() not in suffixes:
        raise ValueError(f"output {path} must end in one of: {', '.join(suffixes)}")
    if target.is_dir():
        raise ValueError(f"output {path} is a directory; give a file name")
    folder = target.parent
    if not folder.is_dir():
        raise ValueError(f"output {path} cannot be written: directory {folder} does not exist")
    try:  # os.access says yes to root even on read-only mounts, so ask the file system itself
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"output {path} is not writable: {error.strerror} ({folder})") from None
    return target


def _current_umask() -> int:
    """Get the process umask (reading it means setting it, so it is put straight back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix) to write to; on success it replaces `path`."""
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        yield Path(staging)
        os.chmod(staging, 0o666 & ~_current_umask())  # mkstemp makes files private; outputs get the usual mode
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def run_sample(args: argparse.Namespace) -> int:
    """Generate a grid of images, and with --gif an animation of the reverse process."""
    from ddpm_fashion.sampling import DEFAULT_INFERENCE_STEPS, ReverseProcessRecorder, check_num_inference_steps
    from ddpm_fashion.sampling import generate_images, image_grid, load_pipeline, save_gif

    out = check_output_path(args.out, IMAGE_SUFFIXES)
    gif = check_output_path(args.gif, (".gif",)) if args.gif else None
    pipe = load_pipeline(args.model, scheduler=args.scheduler, unet=args.unet, device=args.device)
    steps = args.num_inference_steps
    if steps is None:
        steps = DEFAULT_INFERENCE_STEPS.get(args.scheduler)  # None: every training timestep
    steps = check_num_inference_steps(pipe, steps)
    recorder = ReverseProcessRecorder(pipe.scheduler, steps) if gif else None
    images = generate_images(pipe, args.num_images, args.batch_size, steps, args.seed, on_step=recorder)
    with atomic_output(out) as staging:
        image_grid(images).save(staging)
    print(f"wrote {len(images)} images ({args.scheduler} scheduler, {steps} steps) to {out}")
    if gif:
        pictures = recorder.pictures(images)
        with atomic_output(gif) as staging:
            save_gif(pictures, staging)
        print(f"wrote the reverse process ({len(pictures)} frames) to {gif}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """Sample with the own/library U-Net x scheduler pairs; print, and optionally save, the comparison."""
    from ddpm_fashion.compare import comparison_picture, format_table, mismatched_runs, run_comparison, run_label

    report_path = check_output_path(args.json, (".json",)) if args.json else None
    out = check_output_path(args.out, IMAGE_SUFFIXES) if args.out else None
    comparison = run_comparison(args.model, args.num_inference_steps, args.num_images, args.seed, args.device)
    print(format_table(comparison.report))
    if report_path:
        with atomic_output(report_path) as staging:
            staging.write_text(json.dumps(comparison.report, indent=2) + "\n")
        print(f"wrote the report to {report_path}")
    if out:
        with atomic_output(out) as staging:
            comparison_picture(comparison).save(staging)
        print(f"wrote the grids side by side to {out}")
    mismatched = mismatched_runs(comparison.report)
    if mismatched:
        names = ", ".join(f"unet={run_label(run['unet'], run['mode'])} scheduler={run['scheduler']} "
                          f"({run['max_abs_diff']:.3g} > {run['tolerance']:g})" for run in mismatched)
        print(f"{PROG} compare: FAILED: {names} differ from the library images with identical seeds",
              file=sys.stderr)
        return 1
    return 0


def run_forward(args: argparse.Namespace) -> int:
    """Draw real FashionMNIST images through the forward process, beside the alpha-bar and SNR of three schedules."""
    from ddpm_fashion.data import load_fashion_mnist
    from ddpm_fashion.figures import forward_process_figure, one_per_class

    out = check_output_path(args.out, FIGURE_SUFFIXES)
    images, labels = load_fashion_mnist(split="test", data_dir=args.data_dir)
    chosen = one_per_class(labels)
    figure = forward_process_figure(images[chosen], labels[chosen], seed=args.seed)
    with atomic_output(out) as staging:
        figure.savefig(staging, dpi=args.dpi)
    print(f"wrote the forward-process figure to {out}")
    return 0


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit code 2), pointing at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """Parse a command-line integer that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add the options every sampling subcommand shares."""
    parser.add_argument("--model", required=True, help="folder of a saved DDPMPipeline (e.g. the trainer's output_dir)")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="sampling steps, 1..training steps (default: all training steps for DDPM, 50 for "
                             "ddim, 25 for dpm)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CPU generator (same images on CPU and GPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto picks CUDA when present")


def build_parser() -> argparse.ArgumentParser:
    """Get the argument parser with all subcommands, each carrying its handler as `func`."""
    from ddpm_fashion.sampling import SCHEDULER_CHOICES, UNET_CHOICES

    parser = OneLineErrorParser(prog=PROG, description="Sample, compare and explain a DDPM for FashionMNIST.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sample = subparsers.add_parser("sample", help="generate a grid of images (and a GIF of the reverse process)")
    _add_model_options(sample)
    sample.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default="own",
                        help="own/diffusers: DDPM; ddim, dpm (DPM-Solver++): fast samplers from the same config")
    sample.add_argument("--unet", choices=UNET_CHOICES, default="diffusers", help="which U-Net code runs the weights")
    sample.add_argument("--num_images", type=positive_int, default=64)
    sample.add_argument("--batch_size", type=positive_int, default=64, help="images per batch; bounds the memory")
    sample.add_argument("--out", default="samples.png", help="grid image (png, jpg, ...)")
    sample.add_argument("--gif", default=None, help="also write the reverse process (x_t and predicted x_0) here")
    sample.set_defaults(func=run_sample)

    compare = subparsers.add_parser("compare", help="own vs library U-Net and scheduler: differences and speed")
    _add_model_options(compare)
    compare.add_argument("--num_images", type=positive_int, default=64, help="one batch of this many images")
    compare.add_argument("--json", default=None, help="write the report as JSON here")
    compare.add_argument("--out", default=None, help="write the runs' grids side by side here")
    compare.set_defaults(func=run_compare)

    forward = subparsers.add_parser("forward", help="figure: the forward process on real images, and the schedules")
    forward.add_argument("--out", default="forward.png", help="figure file (png, pdf, svg, jpg)")
    forward.add_argument("--data_dir", default=None, help="folder with the FashionMNIST IDX .gz files")
    forward.add_argument("--seed", type=int, default=0, help="seed of the noise")
    forward.add_argument("--dpi", type=positive_int, default=120)
    forward.set_defaults(func=run_forward)

    # evaluate and classifier own their subcommands' options; they import this module's output helpers,
    # so they are imported here rather than at the top.
    from ddpm_fashion import classifier, evaluate

    evaluate.add_parser(subparsers)
    classifier.add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the `ddpm-fashion` command line; return the exit code (2 for bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as usage_exit:  # argparse already printed usage and the error (or --help)
        return usage_exit.code if isinstance(usage_exit.code, int) else 2
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # FileNotFoundError and PermissionError are OSErrors
        print(f"{PROG} {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; outputs are only ever replaced whole
        hint = "; rerun the same command to continue from --samples_file" if getattr(args, "samples_file", None) else ""
        print(f"\n{PROG} {args.command}: interrupted{hint}", file=sys.stderr)
        return 130  # the shell's code for a SIGINT
