"""Activation functions used by learned loss networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def smooth_leaky_relu(x: torch.Tensor, gamma: float = 0.25, beta: float = 5.0) -> torch.Tensor:
    """Smooth leaky ReLU: ``gamma * x + (1 - gamma) * softplus_beta(x)``.

    ``softplus_beta(x) = log(1 + exp(beta * x)) / beta`` (docs/methods/npbml.md; Raymond et al.,
    "Online Loss Function Learning", arXiv 2301.13247). It is a smooth, everywhere-differentiable
    leaky ReLU whose slope runs from ``gamma`` (x -> -inf) to 1 (x -> +inf); smoothness matters
    because learned losses are differentiated twice in meta-training.
    """
    return gamma * x + (1.0 - gamma) * F.softplus(x, beta=beta)


class SmoothLeakyReLU(nn.Module):
    """Module form of :func:`smooth_leaky_relu`."""

    def __init__(self, gamma: float = 0.25, beta: float = 5.0) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return smooth_leaky_relu(x, self.gamma, self.beta)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, beta={self.beta}"
