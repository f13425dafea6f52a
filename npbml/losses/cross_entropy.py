"""Cross-entropy wrapper following the common loss interface."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from npbml.losses.base import check_class_targets, check_reduction


class CrossEntropy(nn.Module):
    """Softmax cross-entropy ``-log p_t`` over ``logits [N, C]`` and class ``targets [N]``.

    A thin wrapper of :func:`torch.nn.functional.cross_entropy` with the ``(logits, targets)``
    interface shared by every loss of :mod:`npbml.losses`; the inputs are validated.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check_class_targets(logits, targets)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=self.reduction
        ).reshape(targets.shape if self.reduction == "none" else ())

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
