"""Warm start of a learned classification loss at cross-entropy (a toolkit option).

**Not in the papers.** ML3 (Bechtle et al., arXiv 1906.05374) and AdaLFL (Raymond et al., arXiv
2301.13247) start the loss network ``g_phi`` from a random initialisation
(docs/methods/learned-losses.md). With ``C`` classes a random ``g`` on softmax probabilities gives
logit gradients ``O(1/C)`` of cross-entropy's and of random sign, and the meta-learner needs many
steps to grow them (see ``docs/results.md``, loss comparison). This module instead regresses
``g_phi`` onto the per-class form of cross-entropy before meta-learning starts, so that
meta-learning refines a loss that already trains the model:

    g*(p, 1) = -log p,   g*(p, 0) = 0           (inputs="prob")
    g*(l, 1) = -l,       g*(l, 0) = 0           (inputs="log_prob", l = log p)

``sum_c g*(., y_c) = -log p_t`` is cross-entropy. The fit is least squares on the values at
random points ``p in [p_min, 1]`` for both targets ``y = 1`` and ``y = 0``.
"""

from __future__ import annotations

import math

import torch

from npbml.losses.learned import LearnedLoss


def cross_entropy_targets(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``g*(p, y) = -y log p``: the per-class terms whose sum over classes is cross-entropy."""
    return -y * torch.log(p)


def regress_to_cross_entropy(
    loss_net: LearnedLoss,
    steps: int = 1000,
    lr: float | None = None,
    points: int = 512,
    p_min: float | None = None,
    seed: int = 0,
    max_error: float | None = None,
) -> float:
    """Fit ``loss_net``'s per-class MLP to cross-entropy's per-class terms, in place.

    Adam (``lr``) on the mean squared error between ``g_phi(input(p), y)`` and ``-y log p`` at
    ``points`` fresh random ``(p, y)`` pairs per step, ``p`` half log-uniform in ``[p_min, 1]``
    (many classes put most probabilities near ``1/C``, so the small-``p`` range matters) and half
    uniform (``p`` near 1 decides the late-training gradient), ``y`` 0 or 1 with equal odds.
    ``input(p)`` is ``p`` or ``log p`` according to ``loss_net.inputs``. The sampling is a pure
    function of ``seed``. ``p_min`` defaults to ``1e-6`` for log-probability
    inputs and ``1e-4`` for probability inputs (a bias-free MLP on ``p`` cannot follow the slope
    ``-1/p`` of ``-log p`` much further down). ``lr`` defaults to ``3e-3`` (log-probabilities;
    at ``1e-2`` a Kaiming-initialised network can end with every softplus output at 0, a dead
    loss) and ``1e-2`` (probabilities). Returns the final mean squared error on a fixed
    evaluation grid (4096 points); raises ``RuntimeError`` when it exceeds ``max_error``
    (default ``0.05`` for log-probability and ``0.5`` for probability inputs), so that a failed
    fit never silently becomes the loss. Only for classification losses.
    """
    if not isinstance(loss_net, LearnedLoss) or loss_net.task != "classification":
        raise ValueError("regress_to_cross_entropy needs a classification LearnedLoss")
    if steps < 1 or points < 1:
        raise ValueError(f"steps and points must be >= 1, got {steps}, {points}")
    log_inputs = loss_net.inputs == "log_prob"
    if p_min is None:
        p_min = 1e-6 if log_inputs else 1e-4
    if lr is None:
        lr = 3e-3 if log_inputs else 1e-2
    if max_error is None:
        max_error = 0.05 if log_inputs else 0.5
    if not 0.0 < p_min < 1.0:
        raise ValueError(f"p_min must lie in (0, 1), got {p_min}")
    gen = torch.Generator().manual_seed(seed)
    param = next(loss_net.parameters())
    dtype, device = param.dtype, param.device
    log_min = math.log(p_min)
    opt = torch.optim.Adam(loss_net.parameters(), lr=lr)

    def inputs(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        first = torch.log(p) if loss_net.inputs == "log_prob" else p
        return torch.stack((first, y), -1)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.rand(n, generator=gen, dtype=dtype)
        # Half log-uniform (small p: a fresh model's 1/C), half uniform (p near 1: late training).
        uniform = torch.rand(n, generator=gen, dtype=dtype) < 0.5
        p = torch.where(uniform, p_min + (1 - p_min) * u, torch.exp(log_min * u))
        y = (torch.rand(n, generator=gen, dtype=dtype) < 0.5).to(dtype)
        return p.to(device), y.to(device)

    with torch.enable_grad():
        for _ in range(steps):
            p, y = sample(points)
            err = loss_net.g(inputs(p, y)) - cross_entropy_targets(p, y)
            loss = err.pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
    grid = torch.exp(torch.linspace(log_min, 0.0, 2048, dtype=dtype, device=device))
    p = torch.cat((grid, grid))
    y = torch.cat((torch.ones_like(grid), torch.zeros_like(grid)))
    with torch.no_grad():
        mse = float((loss_net.g(inputs(p, y)) - cross_entropy_targets(p, y)).pow(2).mean())
    if not mse <= max_error:
        raise RuntimeError(
            f"regress_to_cross_entropy: the loss network fits cross-entropy with mean squared "
            f"error {mse:.3g} > max_error={max_error} after {steps} steps at lr {lr}; use more "
            "steps, a lower lr, or another init of the loss network"
        )
    return mse
