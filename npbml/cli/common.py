"""Pieces every command shares: the :class:`Command` record, the common flags (defined once
here), and small output helpers.

A flag that several commands take (``--set``, ``--device``, ``--json``, ``--config``, ``--out``,
``--no-resume``) is added through the function of that name below, so that it has one spelling,
one destination attribute and one parser on every command.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from npbml.config import Config, ConfigError


@dataclass(frozen=True)
class Command:
    """One ``npbml <name>`` subcommand.

    Attributes:
        name: the word typed after ``npbml``.
        help: one line for ``npbml --help`` (and the command's description).
        add_arguments: adds the command's options to its parser.
        run: the handler, ``run(args) -> exit code`` (``None`` counts as 0).
        description: longer text for ``npbml <name> --help`` (default: ``help``).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None


# ---------------------------------------------------------------------------------------------
# Shared flags
# ---------------------------------------------------------------------------------------------


def add_set_flag(
    p: argparse.ArgumentParser, what: str = "a config value", example: str = "train.seed=1"
) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable) into ``args.overrides``, a list of strings.

    Every command applies them to the raw config mapping with
    :func:`npbml.config.apply_overrides` before validation, so an override gets the checks a
    file gets (``VALUE`` is read as YAML: ``3`` int, ``0.1`` float, ``[1, 2]`` list).

    Args:
        p: the command's parser.
        what: what an override changes, for ``--help``.
        example: an override that makes sense for the command, for ``--help``.
    """
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override {what} (repeatable), e.g. --set {example}",
    )


def add_device_flag(p: argparse.ArgumentParser) -> None:
    """``--device`` (``cpu``, ``cuda`` or ``auto``; default ``cpu``) into ``args.device``.

    Args:
        p: the command's parser.
    """
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")


def add_json_flag(p: argparse.ArgumentParser, help: str = "print one JSON object") -> None:
    """``--json`` (print the result as one JSON object on stdout) into ``args.json``.

    Args:
        p: the command's parser.
        help: what is printed, for ``--help``.
    """
    p.add_argument("--json", action="store_true", help=help)


def add_config_flag(p: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    """``--config FILE`` (a YAML config) into ``args.config``.

    Args:
        p: the command's parser.
        help: which config, for ``--help``.
        required: whether the command needs one.
    """
    p.add_argument("--config", required=required, default=None, help=help)


def add_no_resume_flag(p: argparse.ArgumentParser, help: str) -> None:
    """``--no-resume`` into ``args.no_resume`` (``True`` when given).

    Args:
        p: the command's parser.
        help: what starting over means for the command, for ``--help``.
    """
    p.add_argument("--no-resume", dest="no_resume", action="store_true", help=help)


# ---------------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------------


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """A run directory to write: refused when it exists and is not a directory.

    Args:
        path: the directory given on the command line.
        flag: the option that named it, for the message.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: ``path`` is an existing file (the message names it and the fix).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(
            f"{flag} {str(p)!r} is an existing file, not a directory: choose another {flag} "
            "(a directory, created when missing) or move the file away"
        )
    return p


def pct(x: float) -> str:
    """``0.472`` -> ``"47.20%"``."""
    return f"{100 * x:.2f}%"


def format_accuracy(res: dict[str, Any]) -> str:
    """``"47.20% +- 1.81% (95% CI, 600 tasks)"`` from an evaluation result.

    Args:
        res: a result of :func:`npbml.evaluate.evaluate` (``accuracy``, ``ci95``, ``tasks``).

    Returns:
        The one-line summary.
    """
    return f"{pct(res['accuracy'])} +- {pct(res['ci95'])} (95% CI, {res['tasks']} tasks)"


def describe(config: Config) -> str:
    """One line naming the method, task shape, backbone and inner/outer loop sizes of a run.

    Args:
        config: the run's experiment config.

    Returns:
        e.g. ``"maml on glyphs 5-way 1-shot, conv4(hidden=32), inner lr 0.4, ..."``.
    """
    d, a, m = config.data, config.algorithm, config.model
    opts = ", ".join(f"{k}={v}" for k, v in m.options.items())
    return (
        f"{a.name} on {d.name} {d.ways}-way {d.shots}-shot, {m.name}"
        f"{f'({opts})' if opts else ''}, inner lr {a.inner_lr}, {a.inner_steps} inner steps "
        f"(test {a.eval_inner_steps or a.inner_steps}), meta-batch {config.train.meta_batch_size}"
    )


def use_threads(config: Config) -> None:
    """Run with the config's ``train.threads`` torch CPU threads (``main`` restores the count).

    Args:
        config: the run's experiment config.
    """
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)


def emit(result: dict[str, Any], as_json: bool, text: str) -> None:
    """Print ``result`` as one JSON object (``--json``) or ``text`` for people.

    Args:
        result: the machine-readable result.
        as_json: whether ``--json`` was given.
        text: the human-readable report.
    """
    print(json.dumps(result) if as_json else text)
