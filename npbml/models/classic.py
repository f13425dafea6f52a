"""The small models of the loss-learning papers' protocols: LeNet-5 and the logistic model.

ML3 (Bechtle et al., ICPR 2020, arXiv 1906.05374), EvoMAL (Raymond et al., TPAMI 2023, arXiv
2209.08907) and AdaLFL (Raymond et al., arXiv 2301.13247) train these on MNIST-like data with
ordinary (non-episodic) training; ``npbml fit`` offers them as ``model.name: lenet5`` and
``model.name: logistic`` (docs/methods/learned-losses.md).

Both follow the form used by the EvoMAL reference code (Decadz/Evolved-Model-Agnostic-Loss): LeNet-5
as LeCun et al. (1998) with tanh activations and 2x2 average pooling on a 28x28 input without
padding (two 5x5 convolutions of 6 and 16 channels, then 120-84-``num_classes``), and a single
linear layer on the flattened pixels for the logistic model. Weights are Xavier-uniform and biases
zero, as in that code. Like every backbone here, each model splits into ``features(x)`` and a
linear ``head``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet5", "Logistic"]


def _xavier(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class LeNet5(nn.Module):
    """LeNet-5: conv5x5(6)-tanh-avgpool2, conv5x5(16)-tanh-avgpool2, fc 120-tanh-84-tanh, head.

    Args:
        num_classes: outputs of the head (default 10).
        in_channels: input channels (default 1).
        image_size: side of the square input (default 28, giving 16 x 4 x 4 features).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        side = (int(image_size) - 4) // 2
        side = (side - 4) // 2
        if side < 1:
            raise ValueError(
                f"LeNet5 needs image_size >= 16 (two 5x5 convs, two pools): {image_size}"
            )
        self.body = nn.Sequential(
            nn.Conv2d(int(in_channels), 6, 5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.Tanh(),
            nn.Linear(120, 84),
            nn.Tanh(),
        )
        self.head = nn.Linear(84, int(num_classes))
        self.feature_dim = 84
        _xavier(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 84 penultimate activations."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Logistic(nn.Module):
    """Multinomial logistic regression on the flattened input: one linear layer.

    Args:
        num_classes: outputs (default 10).
        in_features: flattened input size (default 784, a 28x28 image).
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.feature_dim = int(in_features)
        self.head = nn.Linear(self.feature_dim, int(num_classes))
        _xavier(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened input."""
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
