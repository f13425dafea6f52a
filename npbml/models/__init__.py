"""Few-shot backbones: ordinary ``nn.Module``s with a ``features(x)`` / ``head`` split."""

from __future__ import annotations

from typing import Any

from torch import nn

from npbml.models.classic import LeNet5, Logistic
from npbml.models.conv4 import Conv4, ConvBlock
from npbml.models.resnet12 import ResidualBlock, ResNet12

__all__ = [
    "Conv4",
    "ConvBlock",
    "LeNet5",
    "Logistic",
    "MODELS",
    "ResNet12",
    "ResidualBlock",
    "available_models",
    "build_model",
]

MODELS: dict[str, type[nn.Module]] = {
    "conv4": Conv4,
    "resnet12": ResNet12,
    "lenet5": LeNet5,
    "logistic": Logistic,
}


def available_models() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Construct a model by name (``"conv4"``, ``"resnet12"``, ``"lenet5"``, ``"logistic"``) with
    its keyword arguments."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {available_models()}")
    try:
        return MODELS[key](**kwargs)
    except TypeError as e:
        raise TypeError(f"bad arguments for model {name!r}: {e}") from e
