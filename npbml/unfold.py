"""A convolution's input unfolded once, for inner loops whose adapted conv reads a fixed input.

NPBML's inner loop (METHODS.md sec. 3) adapts the last block of a backbone whose leading blocks
are frozen: the input ``h`` of the first adapted conv is the same at every inner step and at the
final query forward. A convolution is a matrix product with the unfolded input (im2col,
:func:`torch.nn.functional.unfold`),

    conv(h; W, b)[n, :, p] = W.flatten(1) @ unfold(h)[n, :, p] + b,

so the unfolding can be done once per episode and every step pays one matrix product. Issue 13
(docs/benchmarks.md): under :func:`torch.func.vmap` with per-task weights a convolution becomes a
grouped convolution plus two layout copies per call, and on the small feature maps of the adapted
block (4x4 -> 2x2 for Conv4 strided at 28x28) the product with precomputed patches costs half of
that, forward and backward. The result is the convolution's, up to float rounding.

:class:`Unfolded` travels in place of the activation ``h`` (a named tuple, so ``vmap`` batches
both fields); :func:`unfolded_conv` is the convolution from it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Unfolded", "can_unfold", "unfold_input", "unfolded_conv"]


class Unfolded(NamedTuple):
    """An activation with its patches for one convolution.

    Attributes:
        x: the activation ``[N, C, H, W]`` (the block may still read it, e.g. FiLM's context).
        patches: ``[N * Ho * Wo, C * kh * kw]``: row ``(n, i, j)`` is the receptive field of
            output position ``(i, j)`` of example ``n`` (the layout of ``F.unfold``, transposed
            so that the convolution is one ``F.linear``).
    """

    x: torch.Tensor
    patches: torch.Tensor


def can_unfold(conv: nn.Module) -> bool:
    """Whether :func:`unfolded_conv` reproduces ``conv``: a 2-d convolution with one group and
    zero padding (``F.unfold`` knows no other padding mode)."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    pad = conv.padding  # a pair of ints: can_unfold refuses the string forms
    return int(pad[0]), int(pad[1])


def _out_size(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    geometry = zip((h, w), conv.kernel_size, conv.stride, _padding(conv), conv.dilation)
    sizes = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in geometry]
    return sizes[0], sizes[1]


def unfold_input(conv: nn.Conv2d, x: torch.Tensor) -> Unfolded:
    """``x`` with its patches for ``conv`` (which must satisfy :func:`can_unfold`).

    Args:
        conv: the convolution that will read ``x``; its geometry (kernel, stride, padding,
            dilation) is read, never its weights.
        x: the activation ``[N, C, H, W]``.

    Returns:
        The :class:`Unfolded` pair.
    """
    if not can_unfold(conv):
        raise ValueError(
            f"unfold_input needs a Conv2d with groups=1 and zero padding, got {conv!r}; "
            "run the convolution on the activation instead"
        )
    cols = F.unfold(
        x, conv.kernel_size, dilation=conv.dilation, padding=_padding(conv), stride=conv.stride
    )  # [N, C*kh*kw, Ho*Wo]
    return Unfolded(x, cols.transpose(1, 2).reshape(-1, cols.shape[1]))


def unfolded_conv(conv: nn.Conv2d, inp: Unfolded) -> torch.Tensor:
    """``conv(inp.x)`` from the patches: one ``F.linear`` with ``conv``'s current weight and bias
    (under ``functional_call`` the substituted ones).

    Args:
        conv: the convolution the patches were unfolded for.
        inp: the activation and its patches.

    Returns:
        ``[N, C_out, Ho, Wo]``: channels-last in memory (the product's natural layout), NCHW in
        shape, equal to ``conv(inp.x)`` up to rounding.
    """
    n, _, h, w = inp.x.shape
    ho, wo = _out_size(conv, h, w)
    out = F.linear(inp.patches, conv.weight.flatten(1), conv.bias)  # [N*Ho*Wo, C_out]
    return out.view(n, ho, wo, -1).permute(0, 3, 1, 2)
