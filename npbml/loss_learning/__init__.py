"""Loss-function learning for ordinary training: ML3 (offline) and AdaLFL (online)."""

from npbml.loss_learning.adalfl import AdaLFL, AdaLFLStep, adalfl_meta_loss
from npbml.loss_learning.ml3 import (
    ML3,
    MetaStepResult,
    default_meta_objective,
    model_params,
    train_with_loss,
    unrolled_step,
)

__all__ = [
    "ML3",
    "AdaLFL",
    "AdaLFLStep",
    "MetaStepResult",
    "adalfl_meta_loss",
    "default_meta_objective",
    "model_params",
    "train_with_loss",
    "unrolled_step",
]
