"""Loss-function learning for ordinary training: ML3 (offline) and AdaLFL (online)."""

from npbml.loss_learning.adalfl import AdaLFL, AdaLFLStep, adalfl_meta_loss
from npbml.loss_learning.ml3 import (
    ML3,
    GuardedLoss,
    MetaStepResult,
    default_meta_objective,
    model_params,
    train_with_loss,
    unrolled_step,
)
from npbml.loss_learning.warm_start import cross_entropy_targets, regress_to_cross_entropy

__all__ = [
    "ML3",
    "GuardedLoss",
    "AdaLFL",
    "AdaLFLStep",
    "MetaStepResult",
    "adalfl_meta_loss",
    "cross_entropy_targets",
    "regress_to_cross_entropy",
    "default_meta_objective",
    "model_params",
    "train_with_loss",
    "unrolled_step",
]
