"""A convolution's input unfolded once, for inner loops whose adapted conv reads a fixed input.

NPBML's inner loop (docs/methods/npbml.md) adapts the last block of a backbone whose leading blocks
are frozen: the input ``h`` of the first adapted conv is the same at every inner step and at the
final query forward. A convolution is a matrix product with the unfolded input (im2col,
:func:`torch.nn.functional.unfold`),

    conv(h; W, b)[n, :, p] = W.flatten(1) @ unfold(h)[n, :, p] + b,

so the unfolding can be done once per episode and every step pays one matrix product. The
patches here list each receptive field in ``(ky, kx, c)`` order rather than ``F.unfold``'s
``(c, ky, kx)``, with the weight permuted to match (:func:`patch_weight`): for channels-innermost
activations that makes the unfolding one strided copy. Issue 13
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

from npbml.algorithms.npbml.layers.norm import spatial_mean

__all__ = ["Unfolded", "can_unfold", "patch_weight", "unfold_input", "unfolded_conv"]


class Unfolded(NamedTuple):
    """An activation with its patches for one convolution.

    Attributes:
        x: the activation ``[N, C, H, W]`` (the block may still read it, e.g. FiLM's context).
        patches: ``[N * Ho * Wo, kh * kw * C]``: row ``(n, i, j)`` is the receptive field of
            output position ``(i, j)`` of example ``n``, in ``(ky, kx, c)`` order (channels
            innermost), so that the convolution is one ``F.linear`` with the weight permuted to
            the same order (:func:`patch_weight`).
        mean: ``[N, C]``, ``x``'s spatial mean: the context a FiLM generator reads from the
            block input (:func:`.film.film_block_forward`), fixed with ``x``.
    """

    x: torch.Tensor
    patches: torch.Tensor
    mean: torch.Tensor


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
    # Channels-innermost patches are one strided copy of the padded NHWC view: 10x faster
    # on CPU than F.unfold's channel-major columns and their transpose (issue 13,
    # docs/benchmarks.md); the small weight is permuted to match at each call instead.
    (ph, pw), (kh, kw) = _padding(conv), conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # [N, H + 2ph, W + 2pw, C]
    win = xp.unfold(1, dh * (kh - 1) + 1, sh)[..., ::dh]  # [N, Ho, W + 2pw, C, kh]
    win = win.unfold(2, dw * (kw - 1) + 1, sw)[..., ::dw]  # [N, Ho, Wo, C, kh, kw]
    patches = win.permute(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * x.shape[1])
    return Unfolded(x, patches, spatial_mean(x))


def patch_weight(weight: torch.Tensor) -> torch.Tensor:
    """A convolution weight ``[C_out, C, kh, kw]`` as the matrix ``[C_out, kh * kw * C]`` that
    multiplies :attr:`Unfolded.patches` (same ``(ky, kx, c)`` order)."""
    return weight.permute(0, 2, 3, 1).flatten(1)


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
    out = F.linear(inp.patches, patch_weight(conv.weight), conv.bias)  # [N*Ho*Wo, C_out]
    return out.view(n, ho, wo, -1).permute(0, 3, 1, 2)
