"""Gradient-based tuning of an EvoMAL candidate's node scalars by unrolled differentiation.

Raymond et al., TPAMI 2023 (arXiv 2209.08907), section 3.3, which uses the offline procedure of
ML3 (Bechtle et al., ICPR 2020, arXiv 1906.05374; docs/methods/learned-losses.md). With base
parameters theta, node scalars w, a training batch (x, y) and a meta batch (x', y'):

    theta'(w) = theta - alpha * grad_theta M_w(y, f_theta(x))          (one differentiable step)
    w        <- Adam(w, grad_w L_CE(y', f_theta'(w)(x')))                (meta step)
    theta    <- theta'.detach()                                          (the base model goes on)

The reference uses 250 meta-steps with Adam lr 1e-3; CPU configs use far fewer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from npbml.evomal.expression import Expression, loss_inputs
from npbml.params import functional_forward

Params = dict[str, torch.Tensor]


def make_mlp(
    in_dim: int, num_classes: int, hidden: list[int], dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The base model of the fitness runs: flatten, then Linear-ReLU layers, then a linear head."""
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers).to(dtype)


def candidate_loss(
    expression: Expression,
    scalars: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """The candidate's loss on a batch: its tree on (one-hot y, softmax f), summed, averaged."""
    y, f = loss_inputs(logits, targets)
    return expression.loss(y, f, scalars)


def sample_batch(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch drawn uniformly with replacement (a pure function of the generator state)."""
    idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=generator)
    return x[idx], y[idx]


def unrolled_meta_loss(
    expression: Expression,
    scalars: torch.Tensor,
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    x_meta: torch.Tensor,
    y_meta: torch.Tensor,
    inner_lr: float,
) -> tuple[torch.Tensor, Params]:
    """ML3 meta-objective of one unrolled step: CE of f_theta'(w) on the meta batch.

    Returns the meta loss (differentiable w.r.t. ``scalars``) and theta' (still in the graph).
    ``params`` must require grad.
    """
    names = list(params)
    loss = candidate_loss(expression, scalars, functional_forward(model, params, x), y)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
    new = {n: params[n] - inner_lr * g for n, g in zip(names, grads)}
    meta = F.cross_entropy(functional_forward(model, new, x_meta), y_meta)
    return meta, new


def init_scalars(
    n: int, generator: torch.Generator, std: float = 1e-3, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """EvoMAL's node-scalar initialisation ``1 + std * N(0, 1)`` (std = 0.001 in the paper)."""
    return 1.0 + std * torch.randn(n, generator=generator, dtype=dtype)


def tune_scalars(
    expression: Expression,
    scalars: torch.Tensor,
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    meta_steps: int,
    meta_lr: float,
    inner_lr: float,
    batch_size: int,
) -> tuple[torch.Tensor, bool]:
    """Tune ``scalars`` for ``meta_steps`` ML3 meta-steps (Adam) on data ``(x, y)``.

    Training and meta batches are drawn independently from ``(x, y)`` with ``generator``; the
    validation data used for fitness is never seen here. Returns the tuned scalars (detached)
    and whether every meta loss and meta-gradient stayed finite; on the first non-finite value
    tuning stops and the last finite scalars are returned.
    """
    w = nn.Parameter(scalars.detach().clone())
    opt = torch.optim.Adam([w], lr=meta_lr)
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    for _ in range(meta_steps):
        xb, yb = sample_batch(x, y, batch_size, generator)
        xm, ym = sample_batch(x, y, batch_size, generator)
        meta, new = unrolled_meta_loss(expression, w, model, theta, xb, yb, xm, ym, inner_lr)
        if not torch.isfinite(meta):
            return w.detach().clone(), False
        opt.zero_grad(set_to_none=True)
        meta.backward()
        if w.grad is None or not torch.isfinite(w.grad).all():
            return w.detach().clone(), False
        backup = w.detach().clone()
        opt.step()
        if not torch.isfinite(w).all():
            return backup, False
        theta = {n: p.detach().requires_grad_(True) for n, p in new.items()}
        if not all(torch.isfinite(p).all() for p in theta.values()):
            return w.detach().clone(), False
    return w.detach().clone(), True
