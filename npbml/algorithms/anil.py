"""ANIL: Raghu et al., "Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness
of MAML", ICLR 2020 (arXiv 1909.09157), section 4.

Only the head adapts in the inner loop; the body is meta-learned through the outer loop. Since
the body does not change during the inner loop, its support features are computed once per task
(with their graph to the body kept on the second-order path), not once per inner step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from npbml.algorithms.base import GradientLearner
from npbml.params import Params, functional_forward, strip_prefix

__all__ = ["ANIL"]


class ANIL(GradientLearner):
    """Almost-No-Inner-Loop: adapts ``head.*`` only. The model needs ``features(x)`` and ``head``
    with ``forward(x) == head(features(x))`` (all :mod:`npbml.models` backbones do)."""

    def __init__(
        self, model: nn.Module, *args: Any, adapt: str | Sequence[str] = ("head.*",), **kwargs: Any
    ) -> None:
        if not (
            callable(getattr(model, "features", None))
            and isinstance(getattr(model, "head", None), nn.Module)
        ):
            raise TypeError(
                f"ANIL needs a model with a features(x) method and a `head` sub-module; "
                f"{type(model).__name__} lacks them"
            )
        # adapt joins kwargs (rather than adapt=adapt beside *args, which mypy rejects as a
        # possible duplicate): the same call, and the same TypeError if *args reaches adapt.
        super().__init__(model, *args, **{**kwargs, "adapt": adapt})
        outside = [n for n in self.adapted_names if not n.startswith("head.")]
        if outside:
            raise ValueError(
                f"ANIL adapts only head parameters, but adapt= also selects {outside}; use MAML"
            )

    def inner_inputs(
        self,
        support_x: torch.Tensor,
        mode: str,
        support_y: torch.Tensor | None = None,
        query_x: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if mode == "second":
            return self.run_module(self.model, None, support_x, method="features")
        # First order / test time: the support features only feed constant inner gradients.
        with torch.no_grad():
            return self.run_module(self.model, None, support_x, method="features")

    def inner_forward(self, inputs: torch.Tensor, params: Params) -> torch.Tensor:
        head = cast(nn.Module, self.model.head)  # checked to be an nn.Module in __init__
        return functional_forward(head, strip_prefix(params, "head."), inputs)
