"""Mean squared error following the common loss interface (the regression task loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from npbml.losses.base import check_reduction


class MeanSquaredError(nn.Module):
    """``mean((predictions - targets)^2)``; ``targets`` are reshaped to the predictions' shape
    (``[N]`` targets for ``[N, 1]`` predictions).

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(predictions, targets.reshape(predictions.shape), reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
