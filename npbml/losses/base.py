"""The common loss interface: a callable ``(predictions, targets) -> scalar``.

Every loss in :mod:`npbml.losses` follows it, so the same object can be the inner-loop loss of a
meta-learner (MAML's ``theta - alpha * grad L(S; theta)``) and the loss of ordinary training.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

REDUCTIONS = ("mean", "sum", "none")


@runtime_checkable
class LossFn(Protocol):
    """Anything called as ``loss(predictions, targets)`` returning a tensor (scalar if reduced)."""

    def __call__(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


def check_reduction(reduction: str) -> str:
    """Validate a ``reduction`` argument (``"mean"``, ``"sum"`` or ``"none"``)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply a reduction to per-example loss values."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def check_smoothing(smoothing: float) -> float:
    """Validate a label-smoothing coefficient xi in [0, 1]."""
    smoothing = float(smoothing)
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    return smoothing


def check_class_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Check ``logits [..., C]`` against integer class ``targets [...]`` with a clear error."""
    if logits.dim() < 1:
        raise ValueError("logits must have a class dimension: expected shape [..., C]")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if targets.dtype in (torch.bool,) or targets.is_floating_point() or targets.is_complex():
        raise TypeError(
            f"targets must be integer class indices (torch.long), got {targets.dtype}; "
            "for one-hot targets use targets.argmax(-1)"
        )
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits shape "
            f"{tuple(logits.shape)}: expected targets of shape {tuple(logits.shape[:-1])}"
        )
    if logits.shape[-1] < 1:
        raise ValueError("logits have zero classes")
