"""``npbml plot``: training and validation curves of ``npbml train`` and ``npbml fit`` runs, from
their ``metrics.jsonl`` (one record layout, :mod:`npbml.run_dir`), as a PNG.

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
    p.add_argument(
        "--out",
        default="curves.png",
        help="the PNG to write (default curves.png; .png is added to a name without extension)",
    )
    p.add_argument(
        "--x",
        choices=("step", "time"),
        default="step",
        help="x axis: steps (default; meta-steps of a train run) or seconds of training",
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
    has = set().union(*(_check_plottable(r, args.panels, args.x) for r in args.runs))
    # A panel no run has a point for (e.g. training accuracy, which fit runs do not log) is left
    # out rather than drawn empty.
    panels = [p for p in args.panels if p in has]
    out = plot_runs(dict(zip(labels, args.runs)), args.out, panels=panels, x=args.x)
    print(f"wrote {out}")
    return 0


def _check_plottable(run_dir: str, panels: list[str], x: str) -> set[str]:
    """The panels a run has points for; a run with none of the chosen ones is refused (it
    would draw empty axes).

    Raises:
        FileNotFoundError: the run has no metrics records.
        ConfigError: none of its records fits ``panels`` (the message names what it has).
    """
    from npbml.plots import PANELS, run_curves

    curves = run_curves(run_dir, x)
    if not any(p in curves for p in panels):
        has = ", ".join(sorted(curves)) or "none"
        wanted = ", ".join(f"{p} ({PANELS[p][1]} {PANELS[p][2]})" for p in panels)
        raise ConfigError(
            f"{run_dir}: nothing to plot for --panels {' '.join(panels)}: its metrics.jsonl has "
            f"no records of {wanted} (curves it has: {has}); choose other --panels"
        )
    return set(curves)


COMMAND = Command(
    "plot",
    "draw training and validation curves of runs (metrics.jsonl) into a PNG",
    add_arguments,
    run,
)
