"""SparseLSR: label smoothing that reads only the target probability.

Raymond, PhD thesis "Meta-Learning Loss Functions for Deep Neural Networks" (arXiv 2406.09713),
and Raymond et al., "Learning Symbolic Model-Agnostic Loss Functions via Meta-Learning" (EvoMAL,
TPAMI 2023, arXiv 2209.08907); the method and its derivation: ``docs/methods/sparse-lsr.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from npbml.losses.base import check_class_targets, check_reduction, check_smoothing

#: Floor of ``1 - p_t`` before its logarithm (see ``docs/methods/sparse-lsr.md``).
ONE_MINUS_PT_FLOOR = 1e-7

#: Targets equal to this are ignored by default, as by ``F.cross_entropy``.
IGNORE_INDEX = -100

#: Below this many classes the backward builds ``p`` as ``exp(z - lse)`` (two cheap passes):
#: torch's CPU softmax kernel has a per-row fixed cost that dominates short rows (measured:
#: 25-38 us against 6 us at [128, 10]); above it the fused softmax is faster.
SOFTMAX_MIN_CLASSES = 256


class _SparseLSRFunction(torch.autograd.Function):
    """Forward and closed-form backward of SparseLSR on ``[M, C]`` logits.

    Differentiating ``L = -A log p_t - B log((1 - p_t) / (C - 1))`` with ``p = softmax(z)``::

        dL/dz_k = (p_k - delta_kt) (1 - B / (1 - p_t))

    (using ``A + B = 1``; where ``1 - p_t`` is under the floor the clamp has zero gradient and
    the factor is ``A``). For ``k = t`` this is ``p_t - A``, as for standard label smoothing.

    Forward is one ``logsumexp`` pass plus ``[M, 1]`` vector work. It returns the loss and two
    ``[M, 1]`` vectors, ``logsumexp`` and ``p_t - 1`` (non-differentiable outputs, the modern
    ``setup_context`` way of saving intermediates), which autograd keeps with the logits (the
    caller's tensor, not a copy) -- no ``[M, C]`` intermediate. Backward builds ``p`` in one
    ``[M, C]`` buffer, writes ``p_t - 1`` (the exact ``expm1``) at the targets and scales rows in
    place. Nothing depends on tensor *values* in Python (no host sync, no data-dependent branch),
    so the Function works under ``torch.compile(fullgraph=True)``, and ``generate_vmap_rule``
    gives it ``torch.func.vmap`` support. Under ``create_graph`` (MAML inner loops) and under
    ``torch.func.grad`` (which always builds the graph) the backward is recomputed from the saved
    logits in differentiable out-of-place ops, so second derivatives are exact.

    ``mask`` is ``None`` (every row counts) or a ``[M, 1]`` 0/1 tensor of the logits' dtype: rows at
    0 (``ignore_index``) contribute nothing, and "mean" divides by the number of rows at 1.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        z: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None,
        a: float,
        b: float,
        reduction: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lse, log_pt = _lse_and_log_pt(z, targets.unsqueeze(-1))
        pt_minus_one = torch.expm1(log_pt)  # -(1 - p_t), exact near p_t = 1
        return _loss(log_pt, pt_minus_one, a, b, z.shape[-1], mask, reduction), lse, pt_minus_one

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        z, targets, mask, a, b, reduction = inputs
        _, lse, pt_minus_one = output
        ctx.mark_non_differentiable(lse, pt_minus_one)
        ctx.set_materialize_grads(False)  # no zero tensors for the two unused gradients
        ctx.save_for_backward(z, targets.unsqueeze(-1), mask, lse, pt_minus_one)
        ctx.save_for_forward(z, targets, mask)  # for the jvp of the subclass below
        ctx.a, ctx.b, ctx.reduction = a, b, reduction

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
        if grad is None:  # grads are not materialised: the loss itself got none
            return None, None, None, None, None, None
        return _backward(ctx, grad), None, None, None, None, None


class _SparseLSRFunctionJvp(_SparseLSRFunction):
    """:class:`_SparseLSRFunction` with forward-mode AD (``torch.func.jvp``/``jacfwd``, hence
    ``torch.func.hessian``). Used in eager mode only: TorchDynamo does not trace a custom
    ``jvp`` (``Unsupported custom jvp``), so under ``torch.compile`` the base class runs."""

    @staticmethod
    def jvp(ctx: Any, z_dot: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        # Forward mode (``torch.func.jvp``/``jacfwd``, e.g. ``torch.func.hessian``), in
        # differentiable ops: d value = coef * (dz_t - <p, dz>), coef = dL / d log p_t.
        z, targets, mask = ctx.saved_tensors
        t_col = targets.unsqueeze(-1)
        log_p = torch.log_softmax(z, -1)
        d_log_pt = z_dot.gather(-1, t_col) - (log_p.exp() * z_dot).sum(-1, keepdim=True)
        coef = _log_pt_coefficient(log_p.gather(-1, t_col), ctx.a, ctx.b)
        values = coef * d_log_pt
        if mask is not None:
            values = values * mask
        if ctx.reduction == "mean":
            loss = values.mean() if mask is None else values.sum() / mask.sum()
        else:
            loss = values.sum() if ctx.reduction == "sum" else values.squeeze(-1)
        return loss, None, None


class _SparseLSREager(torch.autograd.Function):
    """The same Function in the combined ``forward(ctx, ...)`` style, for plain eager calls.

    Used when neither ``torch.compile`` nor a ``torch.func`` transform is active (the classes
    above run there). Two costs of the ``setup_context`` style are skipped: ``Function.apply``
    binds its arguments with ``inspect.signature`` on every call (about 20 us here, a tenth of
    a ``[512, 10]`` forward+backward), and intermediates must be returned as extra outputs.
    Every line of Python counts here: right after other work (a model's forward, another loss)
    each dispatch of this path runs up to twice as slow as back to back with itself
    (``docs/benchmarks.md``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        z: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None,
        a: float,
        b: float,
        reduction: str,
    ) -> torch.Tensor:
        t_col = targets.unsqueeze(-1)
        lse, log_pt = _lse_and_log_pt(z, t_col)
        pt_minus_one = torch.expm1(log_pt)
        ctx.save_for_backward(z, t_col, mask, lse, pt_minus_one)
        ctx.save_for_forward(z, targets, mask)
        ctx.a, ctx.b, ctx.reduction = a, b, reduction
        return _loss(log_pt, pt_minus_one, a, b, z.shape[-1], mask, reduction)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _backward(ctx, grad), None, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, z_dot: torch.Tensor, *_: Any) -> torch.Tensor:
        # Eager forward-mode AD (``torch.autograd.forward_ad`` dual tensors): one output here.
        return _SparseLSRFunctionJvp.jvp(ctx, z_dot)[0]  # type: ignore[return-value]


def _lse_and_log_pt(z: torch.Tensor, t_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logsumexp(z)`` and ``log p_t``, both ``[M, 1]``.

    By hand, sharing the shifted logits with ``log p_t``: measured faster than
    ``torch.logsumexp`` or ``torch.log_softmax`` plus gathers at C = 10 and 100 (CPU). The one
    ``[M, C]`` buffer is freed on return. Row vectors stay ``[M, 1]`` (keepdim): the backward
    broadcasts them without unsqueezes.
    """
    row_max = z.amax(dim=-1, keepdim=True)
    shifted = z - row_max
    log_pt = shifted.gather(-1, t_col)
    log_sum = shifted.exp_().sum(dim=-1, keepdim=True).log_()
    log_pt.sub_(log_sum)
    return log_sum.add_(row_max), log_pt


def _loss(
    log_pt: torch.Tensor,
    pt_minus_one: torch.Tensor,
    a: float,
    b: float,
    num_classes: int,
    mask: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    """``-A log p_t - B log((1 - p_t) / (C - 1))`` per row, masked and reduced."""
    if b > 0.0:
        # 1 - p_t floored, the sign and 1 / (C - 1) folded into one multiply. The clamp always
        # runs: one [M] op, and no host sync to skip it.
        capped = pt_minus_one.clamp_max(-ONE_MINUS_PT_FLOOR)
        values = capped.mul_(-1.0 / (num_classes - 1)).log_().mul_(-b)
        values.add_(log_pt, alpha=-a)
    else:
        values = log_pt.mul_(-a)
    if mask is not None:
        values.mul_(mask)
    if reduction == "mean":
        return values.mean() if mask is None else values.sum() / mask.sum()
    return values.sum() if reduction == "sum" else values.squeeze(-1)


def _backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    """The logits' gradient from the saved ``(z, t_col, mask, lse, p_t - 1)``."""
    z, t_col, mask, lse, pt_minus_one = ctx.saved_tensors
    g = _row_scale(grad, mask, ctx.reduction, z.shape[0])
    if torch.is_grad_enabled():
        return _differentiable_grad(z, t_col, ctx.a, ctx.b, g)
    # -(1 - p_t), with -1 in floored rows: there 1 - B / 1 = A, the clamp's zero-gradient case.
    neg_om = pt_minus_one.masked_fill(pt_minus_one > -ONE_MINUS_PT_FLOOR, -1.0)
    # Row factor g (1 - B / (1 - p_t)) = g + B g / neg_om, one fused op ([M, 1]).
    row = torch.addcdiv(g, g, neg_om, value=ctx.b)
    small = z.shape[-1] < SOFTMAX_MIN_CLASSES
    gz = torch.sub(z, lse).exp_() if small else torch.softmax(z, -1)
    gz.scatter_(-1, t_col, pt_minus_one)  # p - onehot at t
    return gz.mul_(row)


def _row_scale(
    grad: torch.Tensor, mask: torch.Tensor | None, reduction: str, rows: int
) -> torch.Tensor:
    """Upstream gradient of each row's value, ``[M, 1]`` or ``[]`` (broadcast)."""
    if reduction == "none":
        grad = grad.unsqueeze(-1)
    elif reduction == "mean":
        grad = grad * (1.0 / rows) if mask is None else grad / mask.sum()
    return grad if mask is None else grad * mask


def _log_pt_coefficient(log_pt: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """``dL / d log p_t`` per row: ``B / (1 - p_t) - 1``, or ``-A`` under the floor."""
    if b > 0.0:
        one_minus_pt = -torch.expm1(log_pt)
        floored = one_minus_pt.clamp_min(ONE_MINUS_PT_FLOOR)
        return torch.where(one_minus_pt >= ONE_MINUS_PT_FLOOR, b / floored - 1.0, -a)
    return torch.full_like(log_pt, -a)


def _differentiable_grad(
    z: torch.Tensor, t_col: torch.Tensor, a: float, b: float, g: torch.Tensor
) -> torch.Tensor:
    """The closed-form gradient in differentiable ops (for ``create_graph``: second order)."""
    log_pt = z.gather(-1, t_col) - torch.logsumexp(z, -1, keepdim=True)
    s = _log_pt_coefficient(log_pt, a, b) * g
    gz = -torch.softmax(z, -1) * s
    return gz.scatter_add(-1, t_col, s)


def _inspectable(targets: torch.Tensor) -> bool:
    """Whether reading ``targets``' values in Python is free: a plain CPU tensor, in eager mode
    (not under ``torch.compile``, not a ``torch.func.vmap`` batched tensor)."""
    return (
        targets.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(targets)
    )


def _check_cpu_targets(targets: torch.Tensor, num_classes: int, ignore_index: int) -> bool:
    """Raise on labels outside ``[0, C)`` other than ``ignore_index``; whether any is ignored.

    CPU only: ``.item()`` of a CPU tensor is a read of host memory, not a device sync.
    """
    if targets.numel() == 0:
        return False
    lo_t, hi_t = torch.aminmax(targets)
    lo, hi = int(lo_t), int(hi_t)
    if lo < 0 or hi >= num_classes:
        keep = targets != ignore_index
        bad = keep & ((targets < 0) | (targets >= num_classes))
        if bool(bad.any()):
            first = int(targets[bad][0])
            raise ValueError(
                f"targets must be class indices in [0, {num_classes - 1}] for logits with "
                f"{num_classes} classes (or ignore_index={ignore_index}); got {first} "
                f"({int(bad.sum())} target(s) out of range)"
            )
    return lo <= ignore_index <= hi and bool((targets == ignore_index).any())


def _masked(
    targets: torch.Tensor, ignore_index: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets with ignored entries replaced by class 0, and the ``[M, 1]`` 0/1 row mask."""
    keep = targets != ignore_index
    return targets.masked_fill(~keep, 0), keep.to(dtype).unsqueeze(-1)


def _apply(
    z: torch.Tensor, t: torch.Tensor, a: float, b: float, reduction: str, ignore_index: int
) -> torch.Tensor:
    """Run the Function that fits the call (see :func:`sparse_label_smoothing`) on ``[M, C]``
    logits and ``[M]`` targets, masking ``ignore_index`` where labels may hold it."""
    num_classes = z.shape[-1]
    out: torch.Tensor
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        # The setup_context Functions (TorchDynamo does not trace a custom jvp: no jvp there).
        fn = _SparseLSRFunction if torch.compiler.is_compiling() else _SparseLSRFunctionJvp
        mask = None
        # Compiled, CUDA or vmap'd targets: nothing read back, always masked; else checked.
        if not _inspectable(t) or _check_cpu_targets(t, num_classes, ignore_index):
            t, mask = _masked(t, ignore_index, z.dtype)
        out = fn.apply(z, t, mask, a, b, reduction)[0]
    elif not _inspectable(t):  # CUDA etc.: nothing read back (no sync), always masked
        t, mask = _masked(t, ignore_index, z.dtype)
        out = _SparseLSREager.apply(z, t, mask, a, b, reduction)
    elif not 0 <= ignore_index < num_classes:
        # Plain CPU eager call: CPU gather checks every index, so a call whose labels are all in
        # [0, C) pays for no check of its own. An ignored or out-of-range label fails the
        # gather, and only then are the labels read: ValueError for a bad one, else the masked
        # path.
        try:
            out = _SparseLSREager.apply(z, t, None, a, b, reduction)
        except RuntimeError as err:
            if "out of bounds" not in str(err):
                raise
            _check_cpu_targets(t, num_classes, ignore_index)
            t, mask = _masked(t, ignore_index, z.dtype)
            out = _SparseLSREager.apply(z, t, mask, a, b, reduction)
    else:  # an ignore_index that is also a valid class: look for it
        mask = None
        if _check_cpu_targets(t, num_classes, ignore_index):
            t, mask = _masked(t, ignore_index, z.dtype)
        out = _SparseLSREager.apply(z, t, mask, a, b, reduction)
    return out


def sparse_label_smoothing(
    logits: torch.Tensor,
    targets: torch.Tensor,
    smoothing: float,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Sparse label smoothing, in the paper's (subtracted) form.

    With ``C`` classes, smoothing ``xi``, ``p = softmax(z)`` and target ``t``::

        A = 1 - xi + xi / C,   B = xi (C - 1) / C = 1 - A
        L = -A log p_t - B log((1 - p_t) / (C - 1))

    (Raymond's thesis, arXiv 2406.09713, and EvoMAL, arXiv 2209.08907; see
    ``docs/methods/sparse-lsr.md``). The reference repository adds the ``B`` term; the paper's
    equation subtracts it, and only the subtracted form smooths: its gradient w.r.t. the target
    logit is exactly ``p_t - A`` (as for standard label smoothing), and it is a lower bound of
    the standard label-smoothing loss (Jensen on ``log``), equal when the non-target
    probabilities are uniform. For ``C = 2`` the two losses coincide; for ``xi = 0`` it is the
    cross-entropy.

    Stable evaluation: ``log p_t = z_t - logsumexp(z)`` and ``1 - p_t = -expm1(log p_t)``, floored
    at ``1e-7`` (below the floor the ``B`` term's gradient is zero). It runs as one autograd
    Function with the closed-form gradient (:class:`_SparseLSREager` in plain eager calls,
    :class:`_SparseLSRFunction` under ``torch.compile`` and ``torch.func``): forward is one
    ``logsumexp`` pass, backward one softmax pass, and nothing ``[N, C]`` is kept for backward
    besides the logits themselves (float16/bfloat16 logits are kept as their float32 copy), so
    the peak of a forward+backward is the gradient alone. It composes with ``torch.func``
    (``grad``, ``vmap``, ``jvp``/``hessian``, second order through ``create_graph`` as in MAML
    inner loops) and ``torch.compile(fullgraph=True)``. Measured against
    ``F.cross_entropy(label_smoothing=)`` in ``docs/benchmarks.md`` (on one CPU: faster at
    C = 10, 1,000 and 100,000 at N = 512/512/128; slower at C = 100 at N = 128 and 512, where
    its per-call overhead of ~25 small dispatches dominates, faster from N = 2,048).

    Labels are checked without a host sync. On CPU in eager mode a label outside ``[0, C)`` that
    is not ``ignore_index`` raises a ``ValueError`` naming it and the valid range. Elsewhere
    (CUDA tensors, under ``torch.compile`` or a ``vmap`` over the targets) nothing is read back:
    as with ``F.cross_entropy``, an out-of-range label then fails inside the gather kernel (a
    device-side assert on CUDA, reported asynchronously; an index-out-of-bounds error from a
    compiled CPU kernel).

    Args:
        logits: ``[..., C]`` unnormalised scores, any floating dtype.
        targets: ``[...]`` integer class indices in ``[0, C)``, or ``ignore_index``.
        smoothing: ``xi`` in ``[0, 1]``.
        reduction: ``"mean"`` (over the non-ignored examples), ``"sum"`` or ``"none"`` (shape
            ``[...]``, 0 at ignored examples), as in ``F.cross_entropy``.
        ignore_index: targets equal to it contribute nothing (default -100, as in
            ``F.cross_entropy``); with every target ignored, "mean" is NaN, as there.

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
    flat = not (z.dim() == 2 and targets.dtype == torch.long)  # the common case needs no reshape
    t = targets.reshape(-1).long() if flat else targets
    z2 = z.reshape(-1, num_classes) if flat else z
    out = _apply(z2, t, a, b, reduction, ignore_index)
    return out.reshape(targets.shape) if flat and reduction == "none" else out


class SparseLSR(nn.Module):
    """Module form of :func:`sparse_label_smoothing` (``(logits, targets) -> loss``)."""

    def __init__(
        self, smoothing: float = 0.1, reduction: str = "mean", ignore_index: int = IGNORE_INDEX
    ) -> None:
        super().__init__()
        self.smoothing = check_smoothing(smoothing)
        self.reduction = check_reduction(reduction)
        self.ignore_index = int(ignore_index)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sparse_label_smoothing(
            logits, targets, self.smoothing, self.reduction, self.ignore_index
        )

    def extra_repr(self) -> str:
        extra = "" if self.ignore_index == IGNORE_INDEX else f", ignore_index={self.ignore_index}"
        return f"smoothing={self.smoothing}, reduction={self.reduction!r}{extra}"
