"""`ddpm-fashion compare`: own vs library U-Net and scheduler, their differences and speed."""

import argparse
import json
import sys

from ddpm_fashion.commands.options import IMAGE_SUFFIXES, PROG, add_model_options, check_new_output, writing
from ddpm_fashion.guards.inputs import positive_int


def run(args: argparse.Namespace) -> int:
    """Sample with the own/library U-Net x scheduler pairs; print, and optionally save, the comparison."""
    from ddpm_fashion.sampling.own_vs_library import (
        comparison_picture,
        format_table,
        mismatched_runs,
        run_comparison,
        run_label,
    )

    report_path = check_new_output(args.json, (".json",), args.model) if args.json else None
    out = check_new_output(args.out, IMAGE_SUFFIXES, args.model) if args.out else None
    comparison = run_comparison(args.model, args.num_inference_steps, args.num_images, args.seed, args.device)
    print(format_table(comparison.report))
    if report_path:
        with writing(report_path) as staging:
            staging.write_text(json.dumps(comparison.report, indent=2) + "\n")
        print(f"wrote the report to {report_path}")
    if out:
        with writing(out) as staging:
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


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `compare` subcommand."""
    parser = subparsers.add_parser("compare", help="own vs library U-Net and scheduler: differences and speed")
    add_model_options(parser)
    parser.add_argument("--num_images", type=positive_int, default=64, help="one batch of this many images")
    parser.add_argument("--json", default=None, help="write the report as JSON here (a new file)")
    parser.add_argument("--out", default=None, help="write the runs' grids side by side here (a new file)")
    parser.set_defaults(func=run, memory_option="--num_images")
    return parser
