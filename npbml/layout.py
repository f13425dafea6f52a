"""Channels-last execution of a functional forward pass (a memory layout, not a change of math).

On CPU, oneDNN's convolutions are much faster on NHWC ("channels-last") tensors than on NCHW ones
at the sizes of few-shot backbones (Conv4 on 28x28: 3x3 stride-2 convolution 64->64 over 75
images, forward+backward 34 -> 16 ms at one thread; the 1-channel first layer 16 -> 6 ms; 2x2
max-pooling ~13x), and PyTorch keeps a tensor's layout through BatchNorm, ReLU and pooling, so
one channels-last convolution makes the rest of the network channels-last.

The input cannot carry the layout for 1-channel images (``x.contiguous(memory_format=...)`` is a
no-op when C = 1, and models such as learn2learn's ``OmniglotCNN`` reshape their input with
``view``), so :func:`channels_last_params` converts the *weights*: every 4-D parameter is replaced
by a differentiable channels-last copy (``clone(memory_format=torch.channels_last)``; a copy of
the weights only, microseconds), and a convolution with a channels-last weight returns a
channels-last output. Gradients flow back to the original parameters through the copy, so values
and meta-gradients are those of the NCHW computation up to float rounding (identical to ~1e-13
in float64; in float32 the CPU BatchNorm kernel accumulates its channels-last sums in a different
order, so results differ at the 1e-6 level per op, see ``tests/test_layout.py``).

Used by :class:`~npbml.algorithms.base.GradientLearner` (``channels_last=True``, config
``train.channels_last``); usable in any functional inner loop::

    logits = functional_forward(model, channels_last_params(model, fast), x)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from npbml.params import Params, functional_forward

__all__ = ["VIEW_HINT", "channels_last_params", "is_channels_last", "run_channels_last"]

VIEW_HINT = (
    "channels_last=True runs the model on NHWC tensors, and this model calls .view() on a "
    "convolutional activation, which only works on NCHW-contiguous tensors: use .reshape() or "
    "torch.flatten() in the model, or turn channels-last off (learner.channels_last = False, "
    "config train.channels_last: false)"
)


def channels_last_params(module: nn.Module, params: Mapping[str, torch.Tensor] | None) -> Params:
    """``params`` plus a channels-last copy of every 4-D parameter of ``module``.

    Entries of ``params`` win over the module's own tensors (adapted fast weights are converted,
    not replaced by the initialisation); 4-D parameters missing from ``params`` (frozen or
    not-adapted ones) are converted from the module's own. The copies are differentiable, so the
    result can be fed to :func:`npbml.params.functional_forward` inside a second-order inner loop.
    """
    out = dict(params or {})
    for name, p in module.named_parameters():
        if p.dim() == 4:
            src = out.get(name, p)
            if not is_channels_last(src):
                out[name] = src.clone(memory_format=torch.channels_last)
    return out


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-D tensor is strided as NHWC, including the ambiguous 1-channel case that
    ``is_contiguous(memory_format=torch.channels_last)`` also reports for NCHW tensors."""
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        return False
    return t.shape[1] > 1 or t.stride(1) == 1


def run_channels_last(
    module: nn.Module, params: Mapping[str, torch.Tensor] | None, *args: Any, **kwargs: Any
) -> Any:
    """``functional_forward(module, channels_last_params(module, params), *args, **kwargs)``,
    with the fix named in the error when the model's ``view`` cannot take NHWC tensors."""
    try:
        return functional_forward(module, channels_last_params(module, params), *args, **kwargs)
    except RuntimeError as e:
        if "view size is not compatible" in str(e):
            raise RuntimeError(f"{e}\n{VIEW_HINT}") from e
        raise
