"""``npbml train``: meta-train a learner from a YAML experiment config."""

from __future__ import annotations

import argparse
from pathlib import Path

from npbml.cli.common import (
    Command,
    add_config_flag,
    add_no_resume_flag,
    add_set_flag,
    check_out_dir,
    pct,
)
from npbml.config import ConfigError, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``npbml train``.

    Args:
        p: the command's parser.
    """
    add_config_flag(p, "YAML config file (see configs/)")
    add_set_flag(p, example="train.meta_steps=100")
    p.add_argument(
        "--out",
        default=None,
        help="run directory: checkpoints, metrics, config (default: runs/<config file name>)",
    )
    add_no_resume_flag(p, "start over even if DIR/last.pt exists (its files are overwritten)")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="pause once the run has done N meta-steps in total (not N more: rerunning a run "
        "paused at N takes no step; raise N to continue)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Train (or resume) the run, then print where it stopped and how to evaluate it.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The exit code, 0.
    """
    from npbml.train import train

    config = load_config(args.config, args.overrides)
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    out = check_out_dir(args.out if args.out is not None else Path("runs") / Path(args.config).stem)
    result = train(
        config, out, resume=not args.no_resume, max_steps=args.max_steps, progress=not args.quiet
    )
    if result.rank != 0:
        return 0  # under torchrun, rank 0 alone reports
    best = result.best_val_accuracy
    status = "finished" if result.finished else "paused"
    if result.new_steps == 0:
        why = "finished" if result.finished else f"at --max-steps {args.max_steps}"
        print(f"nothing to do: the run is already {why} (step {result.step}); ", end="")
    print(
        f"{status} at step {result.step}/{config.train.meta_steps}; best validation accuracy "
        f"{pct(best) if best is not None else 'n/a'}; run directory {result.out_dir}\n"
        f"evaluate with: npbml eval --checkpoint {result.out_dir}"
    )
    return 0


COMMAND = Command("train", "meta-train a learner from a YAML config", add_arguments, run)
