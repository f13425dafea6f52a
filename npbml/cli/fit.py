"""``npbml fit``: ordinary supervised training with any loss (:func:`npbml.fit.fit`)."""

from __future__ import annotations

import argparse
import json

from npbml.cli.common import (
    Command,
    add_config_flag,
    add_no_resume_flag,
    add_set_flag,
    check_out_dir,
)
from npbml.config import apply_overrides, fit_config_from_dict, read_yaml

FIT_HELP = (
    "ordinary supervised training (CE, label smoothing, SparseLSR, learned loss, ML3, AdaLFL, "
    "evolved loss)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``npbml fit``.

    Args:
        p: the command's parser.
    """
    add_config_flag(p, "YAML file with data/model/optim/loss/train")
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics.jsonl)")
    add_set_flag(p, example="optim.lr=0.05")
    add_no_resume_flag(p, "ignore an existing last.pt")


def run(args: argparse.Namespace) -> int:
    """Load and validate the config, train (or resume), print the final metrics as JSON.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The exit code, 0.
    """
    from npbml.fit import fit

    cfg = fit_config_from_dict(apply_overrides(read_yaml(args.config), args.overrides))
    final = fit(cfg, check_out_dir(args.out), resume=not args.no_resume)
    print(json.dumps(final))
    return 0


COMMAND = Command("fit", FIT_HELP, add_arguments, run)
