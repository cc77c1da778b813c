"""`ddpm-fashion forward`: the forward process on real images, beside alpha-bar and SNR of three schedules."""

import argparse

from ddpm_fashion.commands.options import FIGURE_SUFFIXES, add_seed_option, check_new_output, writing
from ddpm_fashion.guards.inputs import int_arg

# Screen (the figure is about 13 x 10 inches) to print resolution; at the top the PNG is already ~8000 px wide.
DPI_RANGE = (20, 600)


def run(args: argparse.Namespace) -> int:
    """Draw real FashionMNIST images through the forward process, beside the alpha-bar and SNR of three schedules."""
    from ddpm_fashion.data import load_fashion_mnist
    from ddpm_fashion.schedulers.forward_figures import forward_process_figure, one_per_class

    out = check_new_output(args.out, FIGURE_SUFFIXES)
    images, labels = load_fashion_mnist(split="test", data_dir=args.data_dir)
    chosen = one_per_class(labels)
    figure = forward_process_figure(images[chosen], labels[chosen], seed=args.seed)
    with writing(out) as staging:
        figure.savefig(staging, dpi=args.dpi)
    print(f"wrote the forward-process figure to {out}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `forward` subcommand."""
    parser = subparsers.add_parser("forward", help="figure: the forward process on real images, and the schedules")
    parser.add_argument("--out", default="forward.png",
                        help="figure file (png, pdf, svg, jpg); a new file: an existing one is never replaced")
    parser.add_argument("--data_dir", default=None, help="folder with the FashionMNIST IDX .gz files")
    add_seed_option(parser, "seed of the noise")
    parser.add_argument("--dpi", type=int_arg(*DPI_RANGE), default=120,
                        help=f"resolution, {DPI_RANGE[0]} to {DPI_RANGE[1]}")
    parser.set_defaults(func=run, memory_option="--dpi")
    return parser
