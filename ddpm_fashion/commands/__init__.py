"""The subcommands of `ddpm-fashion`, one module each (as diffusers' `commands/`).

Every module has `register(subparsers)`, which adds its parser with the handler as `func` and, as `memory_option`,
the option to lower when it runs out of memory. A handler checks its inputs and outputs before any work and raises
ValueError / OSError with a one-line message on bad input; ddpm_fashion/cli.py prints it.
"""

from ddpm_fashion.commands import compare, evaluate, forward, sample, train_classifier

COMMANDS = (sample, compare, forward, evaluate, train_classifier)
