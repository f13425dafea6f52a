"""Plots of runs and learned losses (needs matplotlib: ``pip install 'npbml[plot]'``).

* :func:`plot_runs`: training and validation curves of ``npbml train`` and ``npbml fit`` runs,
  from each run directory's ``metrics.jsonl`` (``npbml plot``).
* :func:`plot_validation_curves`: the validation curves of several methods against training time
  in one picture (``npbml demo``).
* :func:`plot_learned_loss`: a classification :class:`~npbml.losses.LearnedLoss` as a function of
  the predicted probability ``p`` in [0, 1], for the target class (``y = 1``) and a non-target
  class (``y = 0``) -- the per-class function ``g_phi(p, y)`` of AdaLFL (Raymond et al. 2023,
  arXiv 2301.13247; docs/methods/learned-losses.md) -- with
  cross-entropy's ``-log p`` for reference.
* :func:`plot_loss_snapshots`: how that function changes over an AdaLFL run, from snapshots of
  the loss network's ``state_dict`` (e.g. taken every k steps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from npbml.losses.learned import LearnedLoss
from npbml.run_dir import read_metrics

# The message of a missing matplotlib; it names the extra that installs it.
MISSING_MATPLOTLIB = (
    "plotting needs matplotlib, which is the optional 'plot' extra of npbml: install it with "
    "`pip install 'npbml[plot]'` (or `pip install matplotlib`)"
)


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend.

    Raises:
        ImportError: matplotlib is not installed (the message names the extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(MISSING_MATPLOTLIB) from err
    return plt


def require_matplotlib() -> None:
    """Fail early, before any work, when matplotlib is missing.

    Raises:
        ImportError: matplotlib is not installed (the message names the ``plot`` extra).
    """
    _pyplot()


# (panel title, split of the records, metric key) of each panel :func:`plot_runs` can draw.
PANELS: dict[str, tuple[str, str, str]] = {
    "train-loss": ("training loss (query, mean per logged interval)", "train", "loss"),
    "train-accuracy": ("training accuracy (query)", "train", "accuracy"),
    "validation": ("validation accuracy", "validation", "accuracy"),
}


def run_curves(run_dir: str | Path, x: str = "step") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The curves of one run's ``metrics.jsonl``: ``{panel: (xs, ys)}`` for :data:`PANELS`.

    Args:
        run_dir: a run directory (``npbml train --out`` or ``npbml fit --out``: both write
            the record layout of :mod:`npbml.run_dir`) or its ``metrics.jsonl``.
        x: ``"step"`` (meta-steps, or optimizer steps of a fit run) or ``"time"`` (seconds of
            training since the start, validation included; a validation point gets the time of
            its step's training record, interpolated between logged steps).

    Returns:
        The curves with at least one point (a run with no validation yet has no
        ``"validation"`` entry).

    Raises:
        FileNotFoundError: there is no ``metrics.jsonl`` with records.
        ValueError: ``x`` is neither ``"step"`` nor ``"time"``.
    """
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    path = Path(run_dir)
    path = path if path.suffix == ".jsonl" else path / "metrics.jsonl"
    records = read_metrics(path)
    if not records:
        raise FileNotFoundError(
            f"no training records in {path}: pass the folder that `npbml train --out` or "
            "`npbml fit --out` (or `npbml demo`, one folder per method) wrote"
        )
    train = [r for r in records if r.get("split") == "train" and "time_s" in r]
    t_steps = np.array([r["step"] for r in train], dtype=float)
    t_times = np.array([r["time_s"] for r in train], dtype=float)
    out = {}
    for name, (_, split, key) in PANELS.items():
        rows = [r for r in records if r.get("split") == split and key in r]
        if not rows:
            continue
        steps = np.array([r["step"] for r in rows], dtype=float)
        ys = np.array([r[key] for r in rows], dtype=float)
        if x == "time":
            steps = np.interp(steps, t_steps, t_times) if t_steps.size else steps * math.nan
        out[name] = (steps, ys)
    return out


def plot_runs(
    runs: Mapping[str, str | Path],
    path: str | Path,
    panels: Sequence[str] = tuple(PANELS),
    x: str = "step",
    references: Mapping[str, float] | None = None,
    offsets: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Draw the curves of several runs, one panel per quantity, into a PNG.

    Args:
        runs: label -> run directory (its ``metrics.jsonl``).
        path: the PNG to write.
        panels: names of :data:`PANELS` to draw, side by side.
        x: ``"step"`` or ``"time"`` (see :func:`run_curves`).
        references: label -> a validation accuracy without a curve (a method that trains
            nothing), drawn as a dashed horizontal line in the ``"validation"`` panel.
        offsets: label -> amount added to that run's x values (e.g. seconds of pre-training
            before meta-training started).
        title: the validation panel's title (default: :data:`PANELS`').

    Returns:
        The file written: ``path``, with ``.png`` added when it has no extension.

    Raises:
        ImportError: matplotlib is missing (the message names the ``plot`` extra).
        ValueError: an unknown panel name, or nothing to draw.
    """
    bad = [p for p in panels if p not in PANELS]
    if bad or not panels:
        raise ValueError(f"unknown panel {bad[0] if bad else None!r}; choose from {list(PANELS)}")
    if not runs and not references:
        raise ValueError("no runs to plot: pass at least one run directory")
    plt = _pyplot()
    curves = {label: run_curves(d, x) for label, d in runs.items()}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        for label, c in curves.items():
            if name in c:
                style = "o-" if name == "validation" else "-"
                xs, ys = c[name]
                xs = xs + (offsets or {}).get(label, 0.0)
                ax.plot(xs, ys, style, ms=3, lw=1.2, label=label)
        if name == "validation":
            for i, (label, acc) in enumerate((references or {}).items()):
                ax.axhline(acc, ls="--", lw=1.0, color=f"C{len(curves) + i}", label=label)
        ax.set_title(title if title and name == "validation" else PANELS[name][0], fontsize=9)
        ax.set_xlabel("steps" if x == "step" else "time (s, validation included)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = png_path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def png_path(path: str | Path) -> Path:
    """The file a figure saved to ``path`` lands in: ``path``, with ``.png`` added when it has
    no extension (as matplotlib's ``savefig`` does)."""
    p = Path(path)
    return p if p.suffix else p.with_name(p.name + ".png")


def plot_validation_curves(
    runs: Mapping[str, str | Path],
    path: str | Path,
    references: Mapping[str, float] | None = None,
    offsets: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Every method's validation accuracy against training time, in one panel (the demo's
    picture: methods with very different step costs compared on the clock they shared).

    Args:
        runs: label -> run directory.
        path: the PNG to write.
        references: label -> validation accuracy of a method without a curve (dashed line).
        offsets: label -> seconds before that run's meta-training began (its pre-training).
        title: the panel's title.

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is missing (the message names the ``plot`` extra).
    """
    return plot_runs(
        runs,
        path,
        panels=("validation",),
        x="time",
        references=references,
        offsets=offsets,
        title=title,
    )


@torch.no_grad()
def learned_loss_curves(loss_net: LearnedLoss, points: int = 201) -> dict[str, torch.Tensor]:
    """``g_phi(p, 1)`` and ``g_phi(p, 0)`` on ``p`` in ``[0, 1]``: the per-class learned loss.

    The pairs go straight into the per-class MLP (no softmax), so the curves show the function
    of the predicted probability itself; a loss with ``inputs="log_prob"`` is fed ``log p``
    (``p`` then starts just above 0, where ``log p`` is finite).
    """
    if loss_net.task != "classification":
        raise ValueError("learned_loss_curves plots a classification LearnedLoss")
    log_inputs = getattr(loss_net, "inputs", "prob") == "log_prob"
    p = torch.linspace(1.0 / points if log_inputs else 0.0, 1.0, points)
    weight = next(loss_net.parameters())
    out = {"p": p}
    x = p.log() if log_inputs else p
    for name, y in (("target", 1.0), ("non_target", 0.0)):
        pairs = torch.stack((x, torch.full_like(x, y)), -1).to(weight)
        out[name] = loss_net.g(pairs).cpu()
    return out


def plot_learned_loss(
    loss_net: LearnedLoss, path: str | Path | None = None, ax: Any = None, title: str = ""
) -> Any:
    """Plot the learned loss against the predicted probability; save to ``path`` if given.

    Returns the matplotlib ``Axes``.
    """
    plt = _pyplot()
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    c = learned_loss_curves(loss_net)
    p = c["p"]
    ax.plot(p, c["target"], label="learned, target class (y=1)")
    ax.plot(p, c["non_target"], label="learned, non-target class (y=0)")
    ce = -torch.log(p.clamp_min(1e-3))
    ax.plot(p, ce, "k--", lw=0.8, label="cross-entropy -log p (y=1)")
    ax.set_xlabel("predicted probability p")
    ax.set_ylabel("loss")
    ax.set_title(title or "learned loss g(p, y)")
    ax.legend(fontsize=7)
    if own and path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return ax


def plot_loss_snapshots(
    snapshots: Sequence[tuple[int, Mapping[str, torch.Tensor]]],
    loss_net: LearnedLoss,
    path: str | Path,
) -> Path:
    """Plot ``g_phi(p, 1)`` and ``g_phi(p, 0)`` for each ``(step, state_dict)`` snapshot of an
    AdaLFL run (colour = training step); ``loss_net`` gives the architecture. Saves a PNG."""
    if not snapshots:
        raise ValueError("no snapshots to plot: collect (step, loss_net.state_dict()) pairs")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharex=True)
    cmap = plt.get_cmap("viridis")
    net = LearnedLoss(
        loss_net.task,
        # LearnedLoss.layers holds nn.Linear layers only
        [cast(nn.Linear, layer).out_features for layer in loss_net.layers[:-1]],
        loss_net.output_activation,
    )
    for i, (step, state) in enumerate(snapshots):
        net.load_state_dict(state)
        c = learned_loss_curves(net)
        colour = cmap(i / max(1, len(snapshots) - 1))
        axes[0].plot(c["p"], c["target"], color=colour, label=f"step {step}")
        axes[1].plot(c["p"], c["non_target"], color=colour)
    axes[0].set_title("target class (y=1)")
    axes[1].set_title("non-target class (y=0)")
    for ax in axes:
        ax.set_xlabel("predicted probability p")
    axes[0].set_ylabel("learned loss")
    axes[0].legend(fontsize=7)
    fig.suptitle("learned loss over an AdaLFL run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_run(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Plot the loss snapshots that :func:`npbml.fit.fit` saved for an AdaLFL run
    (``run_dir/loss_snapshots/step*.pt``) into ``path`` (default ``run_dir/learned_loss.png``)."""
    import json

    run = Path(run_dir)
    files = sorted((run / "loss_snapshots").glob("step*.pt"))
    if not files:
        raise FileNotFoundError(
            f"no loss snapshots in {run / 'loss_snapshots'}: not an AdaLFL run?"
        )
    cfg = json.loads((run / "config.json").read_text())["loss"]
    snaps = [(int(f.stem[4:]), torch.load(f, weights_only=True)) for f in files]
    if len(snaps) > 8:  # keep the plot readable: first, last and evenly spaced ones between
        keep = sorted({round(i * (len(snaps) - 1) / 7) for i in range(8)})
        snaps = [snaps[i] for i in keep]
    first = snaps[0][1]
    task = "classification"
    net = LearnedLoss(task, cfg["hidden"], cfg["output_activation"])
    net.load_state_dict(first)
    return plot_loss_snapshots(snaps, net, path or run / "learned_loss.png")


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m npbml.plots RUN_DIR   (an `npbml fit` AdaLFL output folder)")
    print(plot_run(sys.argv[1]))
