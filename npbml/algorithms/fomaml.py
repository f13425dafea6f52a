"""First-order MAML (Finn et al. 2017, section 5.2): the inner gradients are constants, so the
meta-gradient w.r.t. theta is grad L_CE(Q; theta_J) evaluated at the adapted parameters."""

from __future__ import annotations

from typing import Any

from torch import nn

from npbml.algorithms.maml import MAML

__all__ = ["FOMAML"]


class FOMAML(MAML):
    """MAML that is always first order.

    ``first_order`` is accepted (and ignored) so that every learner takes the same constructor
    arguments, e.g. from a config whose ``first_order`` defaults to False.
    """

    def __init__(
        self, model: nn.Module, *args: Any, first_order: bool = True, **kwargs: Any
    ) -> None:
        # first_order joins kwargs (rather than first_order=True beside *args, which mypy rejects
        # as a possible duplicate): the same call, and the same TypeError if *args reaches it.
        super().__init__(model, *args, **{**kwargs, "first_order": True})
