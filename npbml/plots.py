"""Plots of learned loss functions (needs matplotlib: ``pip install 'npbml[plot]'``).

* :func:`plot_learned_loss`: a classification :class:`~npbml.losses.LearnedLoss` as a function of
  the predicted probability ``p`` in [0, 1], for the target class (``y = 1``) and a non-target
  class (``y = 0``) -- the per-class function ``g_phi(p, y)`` of METHODS.md sec 4 -- with
  cross-entropy's ``-log p`` for reference.
* :func:`plot_loss_snapshots`: how that function changes over an AdaLFL run, from snapshots of
  the loss network's ``state_dict`` (e.g. taken every k steps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from npbml.losses.learned import LearnedLoss


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "npbml.plots needs matplotlib: install the plot extra with "
            "`pip install 'npbml[plot]'` (or `pip install matplotlib`)"
        ) from err
    return plt


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
