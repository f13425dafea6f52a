"""``npbml evolve``: EvoMAL's search for a symbolic loss function (:mod:`npbml.evomal`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from npbml.cli.common import Command, add_config_flag, add_no_resume_flag, add_set_flag

EVOLVE_HELP = "EvoMAL: search for a symbolic loss function (genetic programming + tuning)"
EVOLVE_DESCRIPTION = (
    "EvoMAL symbolic loss search (Raymond et al., TPAMI 2023). Resumes from "
    "OUT/checkpoint.json when present; the best loss goes to OUT/best.json."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``npbml evolve``.

    Args:
        p: the command's parser.
    """
    add_config_flag(p, "YAML config (default: CPU-sized)", required=False)
    add_set_flag(p, example="search.population=8")
    p.add_argument("--out", type=Path, required=True, help="output / checkpoint directory")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--generations", type=int, default=None, help="override search.generations")
    p.add_argument("--population", type=int, default=None, help="override search.population")
    add_no_resume_flag(p, "ignore an existing checkpoint and start over")


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, then the dedicated flags as overrides (so they win over ``--set``)."""
    out = list(args.overrides)
    flags = (
        ("seed", "seed"),
        ("generations", "search.generations"),
        ("population", "search.population"),
    )
    for flag, key in flags:
        if getattr(args, flag) is not None:
            out.append(f"{key}={getattr(args, flag)}")
    return out


def run(args: argparse.Namespace) -> int:
    """Build the config, run or resume the search, say where the best loss was saved.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The exit code: 0, or 1 when no candidate survived.
    """
    from npbml.evomal.config import EvolveConfig
    from npbml.evomal.search import EvoMALSearch

    cfg = EvolveConfig.load(args.config, _overrides(args))
    res = EvoMALSearch(cfg, args.out).run(resume=not args.no_resume)
    if res.best is None:
        return 1
    print(f"saved {Path(args.out) / 'best.json'} (load with npbml.evomal.load_evolved_loss)")
    return 0


COMMAND = Command("evolve", EVOLVE_HELP, add_arguments, run, description=EVOLVE_DESCRIPTION)
