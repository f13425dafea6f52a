"""NPBML's inner loop over all tasks of a meta-batch at once (issue 13: the same math, fewer ops).

The per-task path (:meth:`NPBML.task_loss`) runs the 5-step inner loop of one task at a time:
small tensors (the adapted block sees 3x3 or 2x2 feature maps), so its cost is the number of
operations, not their FLOPs. Here the unroll of :meth:`GradientLearner._adapt` is written once
per *task* and vectorised over the tasks with :func:`torch.func.vmap`; the inner gradient is
:func:`torch.func.grad` (differentiable by the outer ``backward``: second order), so the op count
of a meta-step no longer grows with the meta-batch size. Per-task quantities stay per task:
BatchNorm statistics (vmap's batch-norm rule keeps each task's batch apart), FiLM contexts, the
loss terms (means over each task's own examples) and the safeguard's norm.

What differs from the per-task path, by design:

* The safeguard has no Python branch (vmap cannot branch on data): the gradient is multiplied by
  ``where(norm > max, max / norm, 1)`` (exactly 1 when it does not act) and replaced by zeros when
  its norm is non-finite; the counts come back as tensors.
* The per-episode no-grad work (frozen features of ``[S; Q]`` and ``Q``, relation scores) is done
  per task before the vmap, as in the per-task path, and stacked.

The meta-gradients and predictions equal the per-task path's up to float rounding
(``tests/test_npbml_batched.py``: 1e-10 in float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch.func import grad, vmap

from npbml.algorithms.npbml.layers.unfold import Unfolded
from npbml.params import Params
from tasks.episode import Episode

__all__ = ["BatchableLearner", "batchable", "batched_query_logits"]


class BatchableLearner(Protocol):
    """What the batched inner loop needs from a learner (:class:`NPBML` has it all)."""

    inner_optimizer: Any
    inner_max_grad_norm: float | None
    frozen_prefix: int

    def inner_inputs(
        self,
        support_x: torch.Tensor,
        mode: str,
        support_y: torch.Tensor | None = ...,
        query_x: torch.Tensor | None = ...,
    ) -> Any: ...

    def query_features(self, x: torch.Tensor) -> torch.Tensor | Unfolded: ...

    def task_initial_params(self, inputs: Any, support_y: torch.Tensor) -> Params: ...

    def inner_objective(
        self,
        params: Params,
        inputs: Any,
        support_y: torch.Tensor,
        step: int,
        support_x: torch.Tensor,
        query_x: torch.Tensor | None,
    ) -> torch.Tensor: ...

    def forward_from(
        self, h: torch.Tensor | Unfolded, params: Params | None, start: int
    ) -> torch.Tensor: ...


def batchable(tasks: Sequence[Episode]) -> bool:
    """True when every task has the shapes of the first (vmap needs one shape per input)."""
    first = tasks[0]
    shapes = (first.support_x.shape, first.support_y.shape, first.query_x.shape)
    return all(
        (t.support_x.shape, t.support_y.shape, t.query_x.shape) == shapes for t in tasks[1:]
    )


def _safeguard(grads: Params, max_norm: float | None) -> tuple[Params, torch.Tensor]:
    """The per-task safeguard of :meth:`GradientLearner._safeguard` without a data branch;
    returns the gradients and whether it acted (0-d float: 1 clipped or skipped, 0 not)."""
    some = next(iter(grads.values()))
    if max_norm is None:
        return grads, some.new_zeros(())
    norm = torch.linalg.vector_norm(torch.stack([g.detach().norm() for g in grads.values()]))
    finite = torch.isfinite(norm)
    over = norm > max_norm
    scale = torch.where(over, max_norm / norm, torch.ones_like(norm))
    out = {n: torch.where(finite, g * scale, 0.0) for n, g in grads.items()}
    acted = (over | ~finite).to(some.dtype)
    return out, acted


def _stack(items: Sequence[Any]) -> Any:
    """Stack per-task tensors, or per-task :class:`~.layers.unfold.Unfolded` field by field."""
    if isinstance(items[0], Unfolded):
        return Unfolded(*(torch.stack(list(f)) for f in zip(*items)))
    return torch.stack(list(items))


def batched_query_logits(
    learner: BatchableLearner, tasks: Sequence[Episode], steps: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapted query logits of every task, ``[B, Q, N]``, and the safeguard's count of acted
    steps per task ``[B]``; ``mode`` as :meth:`GradientLearner._adapt` (``"second"``,
    ``"first"`` or ``"none"``). Never sees query labels."""
    per_task = [
        learner.inner_inputs(t.support_x, mode, t.support_y, t.query_x) for t in tasks
    ]
    n_s, joint = per_task[0][2], per_task[0][3]
    h0 = _stack([p[0] for p in per_task])
    relation = [p[1] for p in per_task if p[1] is not None]
    scores = torch.stack(relation) if relation else None
    qh = _stack([learner.query_features(t.query_x) for t in tasks])
    sy = torch.stack([t.support_y for t in tasks])
    opt = learner.inner_optimizer
    track = mode != "none"
    second = mode == "second"

    def one_task(
        h: torch.Tensor | Unfolded,
        r: torch.Tensor | None,
        y: torch.Tensor,
        q: torch.Tensor | Unfolded,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs: Any = (h, r, n_s, joint)
        raw = h.x if isinstance(h, Unfolded) else h
        params = learner.task_initial_params(inputs, y)
        if not track:
            params = {n: p.detach() for n, p in params.items()}
        state = opt.init(params)
        acted = next(iter(params.values())).new_zeros(())
        for j in range(steps):

            def objective(p: Params, j: int = j) -> torch.Tensor:
                return learner.inner_objective(p, inputs, y, j, raw, None)

            p_in = params if second else {n: p.detach() for n, p in params.items()}
            g = grad(objective)(p_in)
            if not second:
                g = {n: v.detach() for n, v in g.items()}
            g, a = _safeguard(g, learner.inner_max_grad_norm)
            acted = acted + a
            params, state = opt.step(params, g, state)
        return learner.forward_from(q, params, learner.frozen_prefix), acted

    in_dims = (0, 0 if scores is not None else None, 0, 0)
    logits, acted = vmap(one_task, in_dims=in_dims)(h0, scores, sy, qh)
    return logits, acted
