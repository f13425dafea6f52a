"""Gradient-based meta-learners (the MAML family) with a common interface.

``learner = build_algorithm("maml", model, inner_lr=0.4, inner_steps=1)``;
``fast = learner.adapt(sx, sy)``; ``logits = learner(qx, fast)``;
``loss, metrics = learner.outer_loss(episode)``; ``metrics = learner.evaluate(episode)``;
``learner.meta_parameters()`` for the outer optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from npbml.algorithms.anil import ANIL
from npbml.algorithms.base import GradientLearner, Metrics
from npbml.algorithms.fomaml import FOMAML
from npbml.algorithms.maml import MAML
from npbml.algorithms.metasgd import MetaSGD
from npbml.algorithms.npbml import NPBML, build_npbml
from npbml.algorithms.prototype import PrototypeClassifier

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "FOMAML",
    "GradientLearner",
    "MAML",
    "MetaSGD",
    "NPBML",
    "Metrics",
    "available_algorithms",
    "build_algorithm",
]

#: name -> learner class or builder ``(model, **kwargs) -> learner``; NPBML's builder loads the
#: checkpoints its options name (the learner itself reads no files).
ALGORITHMS: dict[str, Callable[..., Any]] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "metasgd": MetaSGD,
    "anil": ANIL,
    "npbml": build_npbml,
    "proto": PrototypeClassifier,  # nearest prototype, no adaptation
}


def available_algorithms() -> list[str]:
    return sorted(ALGORITHMS)


def build_algorithm(name: str, model: nn.Module, **kwargs: Any) -> GradientLearner:
    """Construct a learner by name (see :func:`available_algorithms`)."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; available: {available_algorithms()}")
    try:
        return ALGORITHMS[key](model, **kwargs)
    except TypeError as e:
        raise TypeError(f"bad arguments for algorithm {name!r}: {e}") from e
