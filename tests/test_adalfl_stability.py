"""AdaLFL cannot lose to cross-entropy by much (issue 28): the tests that would have caught the
collapse. A cheap run under Nesterov momentum and under Adam, and adversarial loss networks.

The data: a 10-class Gaussian mixture in 20-D (fixed centres, 6,000 training and 4,000 held-out
points), an MLP 20-64-64-10, batch 64, 1,500 steps. Under SGD with Nesterov momentum the
papers' unbounded AdaLFL collapses here as it did on Fashion-MNIST LeNet-5 (measured: 22.6% vs
CE's 78.0% at seed 0; the earlier default guard, bounds [0.25, 4], 27.7-44.4% at seeds 0-2),
while the default guard ends within 0.5 points of CE (docs/losses.md, "Why AdaLFL drifted").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from npbml.loss_learning import AdaLFL
from npbml.losses import LearnedLoss

STEPS = 1500
MARGIN = 2.0  # points below CE that the issue allows in this cheap run


def _mixture(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(10, 20, generator=torch.Generator().manual_seed(123)) * 0.6
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return centres[y] + torch.randn(n, 20, generator=g), y


TRAIN, HELD_OUT = _mixture(0, 6000), _mixture(1, 4000)


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "nesterov":
        return torch.optim.SGD(
            model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def _run(optimizer: str, loss: str | nn.Module, guard: bool = True, meta_lr: float = 1e-3) -> float:
    """Held-out accuracy (%) after STEPS steps with ``loss`` ("ce", "adalfl" or a fixed module)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    opt = _optimizer(optimizer, model)
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(0, len(TRAIN[0]), (64,), generator=g)
        return TRAIN[0][i], TRAIN[1][i]

    if loss == "ce":
        for _ in range(STEPS):
            x, y = batch()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    else:
        net = LearnedLoss() if loss == "adalfl" else loss
        assert isinstance(net, nn.Module)
        adalfl = AdaLFL(model, net, optimizer=opt, guard=guard, meta_lr=meta_lr)
        if loss == "adalfl":
            adalfl.offline_init(((batch(), batch()) for _ in range(50)), 50)
        current = batch()
        for _ in range(STEPS):
            following = batch()
            adalfl.step(current, following)
            current = following
    with torch.no_grad():
        return 100 * float((model(HELD_OUT[0]).argmax(1) == HELD_OUT[1]).float().mean())


@pytest.fixture(scope="module")
def ce() -> dict[str, float]:
    return {name: _run(name, "ce") for name in ("nesterov", "adam")}


@pytest.mark.parametrize("optimizer", ["nesterov", "adam"])
def test_adalfl_ends_within_two_points_of_ce(ce, optimizer):
    assert _run(optimizer, "adalfl") >= ce[optimizer] - MARGIN


def test_the_papers_unbounded_form_collapses_under_nesterov_here(ce):
    """The check above has teeth: the unguarded loss falls far below CE in the same run."""
    assert _run("nesterov", "adalfl", guard=False) < ce["nesterov"] - 10


class _Scaled(nn.Module):
    """A loss network gone wrong: ``scale * CE`` (a parameter, so AdaLFL has one to meta-learn)."""

    task = "classification"

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.scale * F.cross_entropy(logits, targets)


@pytest.mark.parametrize("scale", [1e4, -1.0, -1e4])
def test_a_huge_or_sign_flipped_loss_cannot_take_training_below_ce(ce, scale):
    """Frozen (meta_lr 0) and huge or pointing uphill, the guarded loss still trains like CE: its
    step keeps CE's norm, and a direction beyond 60 degrees from CE's is pulled back to it."""
    assert _run("nesterov", _Scaled(scale), meta_lr=0.0) >= ce["nesterov"] - 0.5
