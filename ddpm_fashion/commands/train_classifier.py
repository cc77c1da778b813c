"""`ddpm-fashion train-classifier`: train the FashionMNIST classifier behind fmnist features into a new folder."""

import argparse
import sys

from ddpm_fashion.commands.options import add_seed_option, model_folder_entries, protected_outputs, write_error
from ddpm_fashion.guards.files import check_new_folder, is_disk_full
from ddpm_fashion.guards.inputs import positive_int

DEFAULT_OUT = "fmnist-classifier"


def run(args: argparse.Namespace) -> int:
    """Train the FashionMNIST classifier and save it with its training record into a new folder."""
    from ddpm_fashion.evaluation.classifier import REQUIRED_ACCURACY
    from ddpm_fashion.evaluation.classifier_training import save_classifier, train_classifier

    # Before minutes of training, not after; the folder itself appears only when the model is saved.
    check_new_folder(args.out, "--out", protected_outputs(), model_folder_entries)
    model, record = train_classifier(args.epochs, args.data_dir, args.seed, progress=not args.quiet)
    data_option = f" --data_dir {args.data_dir}" if args.data_dir else ""
    record["command"] = (f"ddpm-fashion train-classifier --out {args.out} --epochs {args.epochs} "
                         f"--seed {args.seed}{data_option}")
    try:
        folder = save_classifier(model, record, args.out)
    except Exception as error:  # OSError, or safetensors' SafetensorError (no OSError) on a full disk
        if not (isinstance(error, OSError) or is_disk_full(error)):
            raise
        raise ValueError(write_error(args.out, error, "--out") + "; nothing was saved") from None
    print(f"test accuracy {record['test_accuracy']:.4f} after {record['epochs']} epochs "
          f"({record['train_seconds']:.0f} s); saved to {folder}")
    if record["test_accuracy"] < REQUIRED_ACCURACY:
        print(f"warning: test accuracy is below the {REQUIRED_ACCURACY:.0%} that fmnist features are meant to have",
              file=sys.stderr)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `train-classifier` subcommand."""
    from ddpm_fashion.evaluation.classifier_training import DEFAULT_EPOCHS

    parser = subparsers.add_parser("train-classifier",
                                   help="train the FashionMNIST classifier behind fmnist FID features")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="new (or empty) folder for config.json, model.safetensors and training.json; the "
                             "weights shipped inside the package are never replaced")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS)
    parser.add_argument("--data_dir", default=None, help="folder with the FashionMNIST IDX .gz files")
    add_seed_option(parser, "seed of the initial weights and the batch order")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, memory_option=None)
    return parser
