"""Meta-SGD: Li et al., "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
arXiv 1707.09835, eq. 2-3.

theta' = theta - alpha o grad L(S; theta), with alpha a meta-learned tensor of the same shape as
theta (initialised to the scalar ``inner_lr``), and (theta, alpha) updated by the outer loop.
"""

from __future__ import annotations

from typing import Any

from npbml.algorithms.base import GradientLearner
from npbml.inner.sgd import InnerSGD, PerParameterLR
from npbml.params import Params

__all__ = ["MetaSGD"]


class MetaSGD(GradientLearner):
    """MAML with learned per-parameter inner rates (``learner.lrs``: a PerParameterLR)."""

    def build_inner_optimizer(self, adapted: Params, **kwargs: Any) -> InnerSGD:
        kwargs["lr"] = PerParameterLR(adapted, init=kwargs["lr"])
        return InnerSGD(**kwargs)

    @property
    def lrs(self) -> PerParameterLR:
        return self.inner_optimizer.lr
