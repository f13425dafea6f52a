"""SparseLSR: label smoothing that reads only the target probability.

Raymond, PhD thesis "Meta-Learning Loss Functions for Deep Neural Networks" (arXiv 2406.09713) and
the EvoMAL paper (arXiv 2209.08907); METHODS.md sec 5.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from npbml.losses.base import check_class_targets, check_reduction, check_smoothing, reduce

#: Floor of ``1 - p_t`` before its logarithm (METHODS.md sec 5).
ONE_MINUS_PT_FLOOR = 1e-7


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
    at ``1e-7`` (below the floor the ``B`` term's gradient is zero). No ``[N, C]`` tensor is built
    besides the logsumexp's own work (and, for float16/bfloat16 inputs, their float32 copy).

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
    z = logits if logits.dtype == torch.float64 else logits.float()
    num_classes = z.shape[-1]
    a = 1.0 - xi + xi / num_classes
    b = 1.0 - a
    log_pt = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    values = -a * log_pt
    if num_classes > 1 and b > 0.0:
        one_minus_pt = (-torch.expm1(log_pt)).clamp_min(ONE_MINUS_PT_FLOOR)
        values = values - b * (torch.log(one_minus_pt) - math.log(num_classes - 1))
    return reduce(values, reduction)


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
