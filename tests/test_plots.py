"""Smoke tests of the learned-loss plots (skipped without matplotlib)."""

import pytest
import torch
from torch import nn

from npbml.loss_learning import AdaLFL
from npbml.losses import LearnedLoss
from npbml.plots import learned_loss_curves

pytest.importorskip("matplotlib")


def test_curves_match_the_network_on_pairs():
    torch.manual_seed(0)
    net = LearnedLoss(hidden=(7, 7))
    c = learned_loss_curves(net, points=5)
    # Independent evaluation through the full loss: a 2-class row whose softmax is (p, 1 - p)
    # with target 0 gives g(p, 1) + g(1 - p, 0); the curves must add up to it.
    p = c["p"][1:-1].double()
    logits = torch.stack((torch.log(p), torch.log1p(-p)), -1)
    net = net.double()
    full = net.per_class(logits, torch.zeros(3, dtype=torch.long)).sum(-1)
    c64 = learned_loss_curves(net, points=5)
    torch.testing.assert_close(full, c64["target"][1:-1] + c64["non_target"].flip(0)[1:-1])


def test_plots_write_png(tmp_path):
    from npbml.plots import plot_learned_loss, plot_loss_snapshots

    torch.manual_seed(0)
    model, net = nn.Linear(3, 3), LearnedLoss(hidden=(8, 8))
    adalfl = AdaLFL(model, net, base_lr=0.1, meta_lr=1e-2)
    snaps = [(0, {k: v.clone() for k, v in net.state_dict().items()})]
    for s in range(3):
        b = (torch.randn(8, 3), torch.randint(0, 3, (8,)))
        adalfl.step(b, b)
        snaps.append((s + 1, {k: v.clone() for k, v in net.state_dict().items()}))
    plot_learned_loss(net, tmp_path / "loss.png")
    plot_loss_snapshots(snaps, net, tmp_path / "snaps.png")
    for name in ("loss.png", "snaps.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_curves_of_a_log_prob_loss_match_the_network():
    """inputs="log_prob": the curve at p is the network on log p (the same full-loss check)."""
    torch.manual_seed(0)
    net = LearnedLoss(hidden=(7, 7), inputs="log_prob").double()
    c = learned_loss_curves(net, points=4)  # p = 0.25, 0.5, 0.75, 1.0
    p = c["p"][:-1].double()
    logits = torch.stack((torch.log(p), torch.log1p(-p)), -1)
    full = net.per_class(logits, torch.zeros(3, dtype=torch.long)).sum(-1)
    other = learned_loss_curves(net, points=4)
    # g(log p, 1) + g(log(1 - p), 0): 1 - p over p = 0.25, 0.5, 0.75 is p reversed.
    torch.testing.assert_close(full, other["target"][:-1] + other["non_target"][:-1].flip(0))
