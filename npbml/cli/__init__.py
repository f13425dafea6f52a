"""Command-line interface: ``npbml <command> ...`` (also ``python -m npbml``).

One module per command; :data:`COMMANDS` lists them explicitly, in ``--help`` order. Flags that
several commands take (``--set``, ``--device``, ``--json``, ...) are defined once, in
:mod:`npbml.cli.common`. Nothing in the library imports this package.

Bad input (missing config file, unknown key, missing dataset, damaged checkpoint) is reported as
one line ``npbml: error: ...`` on stderr with exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from npbml.checkpoint import CheckpointError
from npbml.cli import demo, evaluate, evolve, fit, plot, pretrain, train
from npbml.cli.common import Command, format_accuracy
from npbml.cli.demo import DEMO_RUNS, DemoRun, demo_config
from npbml.config import ConfigError
from tasks.errors import TaskDataError

__all__ = [
    "COMMANDS",
    "Command",
    "DEMO_RUNS",
    "DemoRun",
    "EXIT_USAGE",
    "USER_ERRORS",
    "build_parser",
    "demo_config",
    "format_accuracy",
    "main",
]

# Every command, in the order ``npbml --help`` lists them.
COMMANDS: list[Command] = [
    train.COMMAND,
    evaluate.EVAL,
    evaluate.EVAL_LAKE,
    pretrain.PRETRAIN,
    pretrain.PRETRAIN_RELATION,
    demo.COMMAND,
    fit.COMMAND,
    evolve.COMMAND,
    plot.COMMAND,
]

# Kept so that code which extended the old import-side-effect registry still runs; it is no
# longer read (add a Command to COMMANDS instead).
SUBCOMMAND_MODULES: list[str] = []

# Exceptions that mean "the input is wrong", reported without a traceback (exit code 2).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    CheckpointError,
    TaskDataError,
    FileNotFoundError,
    FloatingPointError,  # a diverging run (train names the step and the settings to change)
)

EXIT_USAGE = 2


def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The ``npbml`` parser with one subparser per command.

    Args:
        commands: the commands to offer (default :data:`COMMANDS`).

    Returns:
        The parser; a parsed namespace carries its handler as ``_run``.

    Raises:
        ValueError: two commands share a name.
    """
    from npbml import __version__

    parser = argparse.ArgumentParser(
        prog="npbml", description="Few-shot meta-learning: train, evaluate, demo."
    )
    parser.add_argument("--version", action="version", version=f"npbml {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    seen: set[str] = set()
    for cmd in COMMANDS if commands is None else commands:
        if cmd.name in seen:
            raise ValueError(f"two commands are named {cmd.name!r}; rename one in COMMANDS")
        seen.add(cmd.name)
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``npbml`` console script.

    Args:
        argv: the arguments after ``npbml`` (default: ``sys.argv[1:]``).

    Returns:
        The exit code: the command's, 2 for bad input, 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with code 2 on bad usage
    threads = torch.get_num_threads()
    try:
        code = args._run(args)
    except USER_ERRORS as e:
        msg = str(e) or type(e).__name__
        if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"npbml: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("npbml: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # commands may set train.threads; main() is reentrant
    return int(code or 0)
