"""``npbml plot``: training and validation curves of runs, from their ``metrics.jsonl``, as a PNG.

matplotlib is the optional ``plot`` extra (``pip install 'npbml[plot]'``); without it the command
stops with one error line naming the extra, before reading anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from npbml.cli.common import Command
from npbml.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``npbml plot``.

    Args:
        p: the command's parser.
    """
    from npbml.plots import PANELS

    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directories (each with a metrics.jsonl)"
    )
    p.add_argument("--out", default="curves.png", help="the PNG to write (default curves.png)")
    p.add_argument(
        "--x",
        choices=("step", "time"),
        default="step",
        help="x axis: meta-steps (default) or seconds of training",
    )
    p.add_argument(
        "--panels",
        nargs="+",
        choices=list(PANELS),
        default=list(PANELS),
        help="the curves to draw, one panel each (default: all)",
    )
    p.add_argument(
        "--labels", nargs="+", default=None, help="legend labels, one per RUN (default: names)"
    )


def _labels(runs: list[str], labels: list[str] | None) -> list[str]:
    """The legend label of each run: ``--labels`` or the folder names (made unique)."""
    if labels is not None:
        if len(labels) != len(runs):
            raise ConfigError(
                f"--labels has {len(labels)} names for {len(runs)} runs; give one per RUN"
            )
        return labels
    names = [Path(r).resolve().name or str(r) for r in runs]
    # Two runs in folders of the same name (runs/a/full, runs/b/full) get their parent too.
    return [
        f"{Path(r).resolve().parent.name}/{n}" if names.count(n) > 1 else n
        for r, n in zip(runs, names)
    ]


def run(args: argparse.Namespace) -> int:
    """Draw the runs' curves into ``--out``.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The exit code: 0, or 2 when matplotlib is missing.
    """
    import sys

    from npbml.plots import plot_runs, require_matplotlib

    try:
        require_matplotlib()
    except ImportError as e:
        print(f"npbml: error: {e}", file=sys.stderr)
        return 2  # bad environment, reported like the CLI's other input errors
    labels = _labels(args.runs, args.labels)
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two runs have the same label ({labels}); pass --labels")
    out = plot_runs(dict(zip(labels, args.runs)), args.out, panels=args.panels, x=args.x)
    print(f"wrote {out}")
    return 0


COMMAND = Command(
    "plot",
    "draw training and validation curves of runs (metrics.jsonl) into a PNG",
    add_arguments,
    run,
)
