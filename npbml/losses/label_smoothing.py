"""Dense-target label smoothing: the reference implementation SparseLSR is compared against."""

from __future__ import annotations

import torch
from torch import nn

from npbml.losses.base import check_class_targets, check_reduction, check_smoothing, reduce


def label_smoothing_ce(
    logits: torch.Tensor, targets: torch.Tensor, smoothing: float, reduction: str = "mean"
) -> torch.Tensor:
    """Standard label smoothing (Szegedy et al. 2016) with an explicit smoothed target.

    Builds the dense target ``q = (1 - xi) * onehot(t) + xi / C`` (an ``[N, C]`` tensor) and returns
    ``-sum_c q_c log p_c``, i.e. the "standard LSR" of docs/methods/sparse-lsr.md:
    ``L = -A log p_t - (xi/C) sum_{j != t} log p_j`` with ``A = 1 - xi + xi/C``.
    It is deliberately the memory-hungry form, kept only for tests and benchmarks; prefer
    ``F.cross_entropy(label_smoothing=xi)`` or
    :func:`~npbml.losses.sparse_lsr.sparse_label_smoothing`.
    Computed in at least float32.
    """
    check_class_targets(logits, targets)
    xi = check_smoothing(smoothing)
    check_reduction(reduction)
    z = logits if logits.dtype == torch.float64 else logits.float()
    num_classes = z.shape[-1]
    q = torch.full_like(z, xi / num_classes)
    q.scatter_add_(-1, targets.unsqueeze(-1), torch.full_like(z[..., :1], 1.0 - xi))
    values = -(q * torch.log_softmax(z, dim=-1)).sum(-1)
    return reduce(values, reduction)


class LabelSmoothingCE(nn.Module):
    """Module form of :func:`label_smoothing_ce` (dense smoothed target; reference only)."""

    def __init__(self, smoothing: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        self.smoothing = check_smoothing(smoothing)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return label_smoothing_ce(logits, targets, self.smoothing, self.reduction)

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, reduction={self.reduction!r}"
