"""Meta-only parameters inside learn2learn's MAML: adapt a chosen subset in the inner loop.

learn2learn's ``MAML.adapt(loss)`` (Arnold et al., "learn2learn: A Library for Meta-Learning
Research", 2020; version 0.2.0) takes one SGD step on *every* parameter of the cloned module
(Finn et al., 2017, eq. 1: ``theta' = theta - alpha grad_theta L_S(theta)``). Its only way to keep
a parameter out of the step is ``allow_nograd=True`` together with ``requires_grad=False`` on that
parameter, which also removes it from the meta-gradient: the parameter is *frozen*, not
meta-learned.

NPBML's warp layers (omega, :mod:`npbml.algorithms.npbml.layers.warp`) and FiLM generators (psi,
:mod:`npbml.algorithms.npbml.layers.film`) are *meta-only*: fixed during the inner loop, learned in
the outer loop (Raymond et al., arXiv 2406.07983, docs/methods/npbml.md; Flennerhag et al., 2020,
WarpGrad). :func:`maml_adapt` gives that with learn2learn's own update: it differentiates the inner
loss w.r.t. the adapted parameters only and hands learn2learn's ``maml_update`` a ``None`` gradient
for the meta-only ones, which ``maml_update`` leaves untouched. The meta-only parameters then stay
in the graph of the adapted learner and receive the full second-order meta-gradient, through the
query forward pass and through the inner gradient.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from npbml.algorithms.npbml.layers.film import FiLMGenerator
from npbml.algorithms.npbml.layers.warp import WarpLayer

__all__ = ["META_ONLY_TYPES", "maml_adapt", "meta_only_names"]

#: Module types whose parameters NPBML never adapts in the inner loop (warps omega, FiLM psi).
META_ONLY_TYPES: tuple[type[nn.Module], ...] = (WarpLayer, FiLMGenerator)


def meta_only_names(
    model: nn.Module, types: tuple[type[nn.Module], ...] = META_ONLY_TYPES
) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters that live inside a submodule
    of one of ``types``: by default every :class:`~npbml.algorithms.npbml.layers.warp.WarpLayer`
    and :class:`~npbml.algorithms.npbml.layers.film.FiLMGenerator` (including the generators inside
    ``FiLMBlock`` and ``FiLMLinear``). Pass the result as ``meta_only`` to :func:`maml_adapt`."""
    owned: set[int] = set()
    for module in model.modules():
        if isinstance(module, types):
            owned.update(id(p) for p in module.parameters())
    return [name for name, p in model.named_parameters() if id(p) in owned]


def maml_adapt(
    learner: Any,
    loss: torch.Tensor,
    meta_only: Collection[str] = (),
    *,
    lr: float | None = None,
    first_order: bool | None = None,
    allow_unused: bool | None = None,
) -> None:
    """One inner step of a learn2learn ``MAML`` clone that leaves ``meta_only`` parameters alone.

    Equivalent to ``learner.adapt(loss)`` (``theta' = theta - lr * grad L``, second order unless
    ``first_order``) restricted to the parameters *not* named in ``meta_only``; those keep their
    values but stay differentiable, so ``query_loss.backward()`` gives them a meta-gradient.

    Args:
        learner: a clone from ``l2l.algorithms.MAML(model, lr).clone()``.
        loss: the inner (support) loss computed with ``learner``; any differentiable loss, e.g.
            :class:`npbml.losses.LearnedLoss` applied to ``learner(x)``.
        meta_only: parameter names of the wrapped model (``model.named_parameters()`` names,
            e.g. from :func:`meta_only_names`) that the inner loop must not change.
        lr, first_order, allow_unused: default to the learner's own settings (``lr`` may be
            a float or a tensor, as in learn2learn).
    """
    try:
        from learn2learn.algorithms.maml import MAML, maml_update
    except ImportError as exc:  # pragma: no cover - only reached without learn2learn
        raise ImportError(
            "maml_adapt needs learn2learn; build its environment with "
            "scripts/install_learn2learn.sh (docs/learn2learn.md)"
        ) from exc
    if not isinstance(learner, MAML):
        # MetaSGD / GBML update with learned rates or transforms: maml_update would be wrong.
        raise TypeError(
            f"maml_adapt expects a learn2learn MAML learner (l2l.algorithms.MAML(...).clone()), "
            f"got {type(learner).__name__}"
        )
    named = list(learner.module.named_parameters())
    names = {n for n, _ in named}
    unknown = sorted(set(meta_only) - names)
    if unknown:
        raise KeyError(
            f"meta_only names {unknown} are not parameters of the wrapped model; use names from "
            f"model.named_parameters() (e.g. meta_only_names(model)), such as {sorted(names)[:4]}"
        )
    lr = learner.lr if lr is None else lr
    first_order = bool(learner.first_order if first_order is None else first_order)
    allow_unused = bool(learner.allow_unused if allow_unused is None else allow_unused)
    skip = set(meta_only)
    adapted = [p for n, p in named if n not in skip]
    if not adapted:
        raise ValueError("every parameter is meta_only: nothing left to adapt")
    grads = iter(
        torch.autograd.grad(
            loss,
            adapted,
            retain_graph=not first_order,
            create_graph=not first_order,
            allow_unused=allow_unused,
        )
    )
    # One entry per parameter in module.parameters() order, which maml_update zips against.
    full = [None if n in skip else next(grads) for n, _ in named]
    learner.module = maml_update(learner.module, lr, full)
