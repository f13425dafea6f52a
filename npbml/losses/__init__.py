"""Loss functions with one interface, ``loss(predictions, targets) -> scalar``.

Usable as the inner-loop loss of any meta-learner and as the loss of ordinary training.
:func:`build_loss` builds one by name: ``"ce"``, ``"label_smoothing"``, ``"sparse_lsr"``,
``"learned"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from npbml.losses.base import LossFn
from npbml.losses.cross_entropy import CrossEntropy
from npbml.losses.label_smoothing import LabelSmoothingCE, label_smoothing_ce
from npbml.losses.learned import (
    LearnedLoss,
    all_finite,
    restore_parameters,
    snapshot_parameters,
)
from npbml.losses.sparse_lsr import SparseLSR, sparse_label_smoothing

LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": CrossEntropy,
    "label_smoothing": LabelSmoothingCE,
    "sparse_lsr": SparseLSR,
    "learned": LearnedLoss,
}


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a loss module by name (see :data:`LOSSES`); ``kwargs`` go to its constructor.

    Example: ``build_loss("sparse_lsr", smoothing=0.1)``.
    """
    try:
        factory = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; available: {sorted(LOSSES)}") from None
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise TypeError(f"bad arguments for loss {name!r}: {err}") from err


__all__ = [
    "LOSSES",
    "CrossEntropy",
    "LabelSmoothingCE",
    "LearnedLoss",
    "LossFn",
    "SparseLSR",
    "all_finite",
    "build_loss",
    "label_smoothing_ce",
    "restore_parameters",
    "snapshot_parameters",
    "sparse_label_smoothing",
]
