"""SparseLSR: label smoothing that reads only the target probability.

Raymond, PhD thesis "Meta-Learning Loss Functions for Deep Neural Networks" (arXiv 2406.09713) and
the EvoMAL paper (arXiv 2209.08907); METHODS.md sec 5.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from npbml.losses.base import check_class_targets, check_reduction, check_smoothing

#: Floor of ``1 - p_t`` before its logarithm (METHODS.md sec 5).
ONE_MINUS_PT_FLOOR = 1e-7


#: Below this many classes the backward builds ``p`` as ``exp(z - lse)`` (two cheap passes):
#: torch's CPU softmax kernel has a per-row fixed cost that dominates short rows (measured:
#: 25-38 us against 6 us at [128, 10]); above it the fused softmax is faster.
SOFTMAX_MIN_CLASSES = 256


class _SparseLSRFunction(torch.autograd.Function):
    """Forward and closed-form backward of SparseLSR on ``[M, C]`` logits (METHODS.md sec 5).

    Differentiating ``L = -A log p_t - B log((1 - p_t) / (C - 1))`` with ``p = softmax(z)``::

        dL/dz_k = (p_k - delta_kt) (1 - B / (1 - p_t))

    (using ``A + B = 1``; where ``1 - p_t`` is under the floor the clamp has zero gradient and
    the factor is ``A``). For ``k = t`` this is ``p_t - A``, as for standard label smoothing.
    Forward is one ``logsumexp`` pass plus ``[M]`` vector work; autograd keeps the logits (the
    caller's tensor, not a copy) and two ``[M]`` vectors (``logsumexp`` and ``p_t - 1``) -- no
    ``[M, C]`` intermediate. Backward builds ``p`` in one ``[M, C]`` buffer, writes ``p_t - 1``
    (the exact ``expm1``) at the targets and scales rows in place. The per-op dispatch cost
    matters at small ``C`` (every op costs microseconds on ``[128, 10]``), hence the folded
    scalar arithmetic. Under ``create_graph`` (MAML inner loops) the backward is recomputed from
    the saved logits in differentiable ops, so second derivatives are exact.
    """

    @staticmethod
    def forward(
        ctx: Any, z: torch.Tensor, targets: torch.Tensor, a: float, b: float, reduction: str
    ) -> torch.Tensor:
        # logsumexp by hand, sharing its shifted logits with log p_t: 8 dispatches instead of
        # torch.logsumexp's ~9 plus a gather and a subtraction (dispatch cost rules at small C;
        # torch.log_softmax + two gathers measured no faster at C = 10).
        row_max = z.amax(dim=-1, keepdim=True)
        shifted = z - row_max
        log_pt = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        log_sum = shifted.exp_().sum(dim=-1).log_()
        log_pt.sub_(log_sum)
        lse = log_sum.add_(row_max.squeeze(-1))
        pt_minus_one = torch.expm1(log_pt)  # -(1 - p_t), exact near p_t = 1
        # Whether any row is under the 1 - p_t floor: usually none, and then neither pass needs
        # the clamp or its mask (one reduction instead of three dispatches).
        ctx.floored = (
            b > 0.0
            and bool(pt_minus_one.numel())
            and float(pt_minus_one.max()) > -ONE_MINUS_PT_FLOOR
        )
        if b > 0.0:
            # log((1 - p_t) / (C - 1)), the sign and 1 / (C - 1) folded into one multiply.
            capped = pt_minus_one.clamp_max(-ONE_MINUS_PT_FLOOR) if ctx.floored else pt_minus_one
            values = capped.mul(-1.0 / (z.shape[-1] - 1)).log_().mul_(-b)
            values.add_(log_pt, alpha=-a)
        else:
            values = log_pt.mul_(-a)
        ctx.save_for_backward(z, targets, lse, pt_minus_one)
        ctx.a, ctx.b, ctx.reduction = a, b, reduction
        if reduction == "mean":
            return values.mean()
        return values.sum() if reduction == "sum" else values

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, targets, lse, pt_minus_one = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiable_grad(z, targets, ctx.a, ctx.b, ctx.reduction, grad)
        b = ctx.b
        # Row factor r = g (1 - B / (1 - p_t)) (= g A under the floor); g the upstream gradient,
        # a Python float for "mean"/"sum" (folded into scalars) and an [M] tensor for "none".
        g: float | torch.Tensor = grad.item() if grad.dim() == 0 else grad
        if ctx.reduction == "mean":
            g = g / z.shape[0]
        # -(1 - p_t), with -1 in floored rows: there 1 - B / 1 = A, the clamp's zero-gradient case.
        neg_om = pt_minus_one
        if ctx.floored:
            neg_om = torch.where(pt_minus_one > -ONE_MINUS_PT_FLOOR, -1.0, pt_minus_one)
        if isinstance(g, float):
            row = torch.reciprocal(neg_om).mul_(b * g).add_(g)
        else:
            row = torch.reciprocal(neg_om).mul_(b).add_(1.0).mul_(g)
        row = row.unsqueeze(-1)
        if z.shape[-1] < SOFTMAX_MIN_CLASSES:
            gz = torch.sub(z, lse.unsqueeze(-1)).exp_()
        else:
            gz = torch.softmax(z, -1)
        gz.scatter_(-1, targets.unsqueeze(-1), pt_minus_one.unsqueeze(-1))  # p - onehot at t
        return gz.mul_(row), None, None, None, None


def _differentiable_grad(
    z: torch.Tensor, targets: torch.Tensor, a: float, b: float, reduction: str, grad: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """The closed-form gradient in differentiable ops (for ``create_graph``: second order)."""
    log_pt = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)
    if b > 0.0:
        one_minus_pt = -torch.expm1(log_pt)
        floored = one_minus_pt.clamp_min(ONE_MINUS_PT_FLOOR)
        coef = torch.where(one_minus_pt >= ONE_MINUS_PT_FLOOR, b / floored - 1.0, -a)
    else:
        coef = torch.full_like(log_pt, -a)
    s = (coef * (grad / z.shape[0] if reduction == "mean" else grad)).unsqueeze(-1)
    gz = -torch.softmax(z, -1) * s
    return gz.scatter_add(-1, targets.unsqueeze(-1), s), None, None, None, None


def sparse_label_smoothing(
    logits: torch.Tensor, targets: torch.Tensor, smoothing: float, reduction: str = "mean"
) -> torch.Tensor:
    """Sparse label smoothing, in the paper's (subtracted) form.

    With ``C`` classes, smoothing ``xi``, ``p = softmax(z)`` and target ``t``::

        A = 1 - xi + xi / C,   B = xi (C - 1) / C = 1 - A
        L = -A log p_t - B log((1 - p_t) / (C - 1))

    (METHODS.md sec 5). The reference repository adds the ``B`` term; the paper's equation
    subtracts it, and only the subtracted form smooths: its gradient w.r.t. the target logit is
    exactly ``p_t - A`` (as for standard label smoothing), and it is a lower bound of the standard
    label-smoothing loss (Jensen on ``log``), equal when the non-target probabilities are uniform.
    For ``C = 2`` the two losses coincide; for ``xi = 0`` it is the cross-entropy.

    Stable evaluation: ``log p_t = z_t - logsumexp(z)`` and ``1 - p_t = -expm1(log p_t)``, floored
    at ``1e-7`` (below the floor the ``B`` term's gradient is zero). It runs as one autograd
    Function with the closed-form gradient (:class:`_SparseLSRFunction`): forward is one
    ``logsumexp`` pass, backward one softmax pass, and nothing ``[N, C]`` is kept for backward
    besides the logits themselves (float16/bfloat16 logits are kept as their float32 copy).
    Measured against ``F.cross_entropy(label_smoothing=)`` in ``docs/benchmarks.md``.

    Args:
        logits: ``[..., C]`` unnormalised scores, any floating dtype.
        targets: ``[...]`` integer class indices in ``[0, C)``.
        smoothing: ``xi`` in ``[0, 1]``.
        reduction: ``"mean"`` (over all examples), ``"sum"`` or ``"none"`` (shape ``[...]``).

    Returns:
        The loss, computed in float32 (float64 inputs stay float64): the result dtype is
        ``torch.promote_types(logits.dtype, torch.float32)``, so float16/bfloat16 logits give a
        float32 loss and their gradient comes back in the input dtype.
    """
    check_class_targets(logits, targets)
    xi = check_smoothing(smoothing)
    check_reduction(reduction)
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    num_classes = z.shape[-1]
    a = 1.0 - xi + xi / num_classes
    b = 1.0 - a if num_classes > 1 else 0.0
    if z.dim() == 2 and targets.dtype == torch.long:  # the common case, without extra dispatches
        return _SparseLSRFunction.apply(z, targets, a, b, reduction)
    flat_t = targets.reshape(-1).long()
    out = _SparseLSRFunction.apply(z.reshape(-1, num_classes), flat_t, a, b, reduction)
    return out.reshape(targets.shape) if reduction == "none" else out


class SparseLSR(nn.Module):
    """Module form of :func:`sparse_label_smoothing` (``(logits, targets) -> loss``)."""

    def __init__(self, smoothing: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        self.smoothing = check_smoothing(smoothing)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sparse_label_smoothing(logits, targets, self.smoothing, self.reduction)

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, reduction={self.reduction!r}"
