"""Gradient-based meta-learners (the MAML family) with a common interface.

``learner = build_algorithm("maml", model, inner_lr=0.4, inner_steps=1)``;
``fast = learner.adapt(sx, sy)``; ``logits = learner(qx, fast)``;
``loss, metrics = learner.outer_loss(episode)``; ``metrics = learner.evaluate(episode)``;
``learner.meta_parameters()`` for the outer optimizer.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from npbml.algorithms.anil import ANIL
from npbml.algorithms.base import GradientLearner, Metrics
from npbml.algorithms.fomaml import FOMAML
from npbml.algorithms.maml import MAML
from npbml.algorithms.metasgd import MetaSGD

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

ALGORITHMS: dict[str, type[GradientLearner]] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "metasgd": MetaSGD,
    "anil": ANIL,
}

# Registers "npbml" (and its validated config options); imported after ALGORITHMS exists because
# that module adds itself to it.
from npbml.algorithms.npbml import NPBML  # noqa: E402


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
