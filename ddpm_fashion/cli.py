"""The `ddpm-fashion` command line (also `python -m ddpm_fashion`): the parser, dispatch and error reporting.

Each subcommand lives in ddpm_fashion/commands/ and registers its own parser. A subcommand checks its inputs and
output paths before any work and raises ValueError / OSError with a one-line message on bad input; `main` prints
that as `ddpm-fashion <subcommand>: error: <message>` and returns exit code 2, with no traceback and nothing
written. Running out of memory is reported the same way, naming the option to lower. Files are written under a
temporary name in the target folder and renamed into place, so none is ever half-written.
"""

import argparse
import re
import sys
from typing import List, Optional

from ddpm_fashion.commands import COMMANDS
from ddpm_fashion.commands.options import PROG
from ddpm_fashion.guards.inputs import one_line
from ddpm_fashion.training.resources import is_out_of_memory


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit code 2), pointing at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Get the argument parser with all subcommands, each carrying its handler as `func`."""
    parser = OneLineErrorParser(prog=PROG, description="Sample, compare and explain a DDPM for FashionMNIST.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def _out_of_memory_message(error: BaseException, option: Optional[str]) -> str:
    """Get the one-line report of a failed allocation, naming the option that bounds the memory."""
    advice = f"; lower {option}" if option else "; free memory or use a machine with more"
    message = one_line(error)
    # torch's messages run to several sentences of allocator detail; the size asked for is what the user can act on.
    asked = re.search(r"[Tt]ried to allocate [0-9.]+ ?[A-Za-z]+", message)
    return f"out of memory ({asked.group(0).strip() if asked else message[:150]}){advice}"


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
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise  # a bug, not bad input: the traceback is what a report needs
        print(f"{PROG} {args.command}: error: {_out_of_memory_message(error, args.memory_option)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; outputs are only ever replaced whole
        hint = "; rerun the same command to continue from --samples_file" if getattr(args, "samples_file", None) else ""
        print(f"\n{PROG} {args.command}: interrupted{hint}", file=sys.stderr)
        return 130  # the shell's code for a SIGINT
