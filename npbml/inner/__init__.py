"""Differentiable inner-loop pieces: optimizers, learned rates, inner losses."""

from npbml.inner.losses import (
    CONTEXT_KEYS,
    InnerLoss,
    accepts_context,
    call_inner_loss,
    cross_entropy,
)
from npbml.inner.sgd import InnerSGD, PerParameterLR, Preconditioner, SGDState
from npbml.inner.torch_optim import TorchOptimStep

__all__ = [
    "CONTEXT_KEYS",
    "InnerLoss",
    "InnerSGD",
    "PerParameterLR",
    "Preconditioner",
    "SGDState",
    "TorchOptimStep",
    "accepts_context",
    "call_inner_loss",
    "cross_entropy",
]
