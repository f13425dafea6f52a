"""Per-channel reductions for NPBML's adapted blocks that are fast in their memory layout.

:func:`batch_norm`: BatchNorm with batch statistics, written as reductions and elementwise
operations. :func:`spatial_mean`: global average pooling whose gradient keeps the activation's
layout.

Ioffe & Szegedy, "Batch Normalization", ICML 2015, Algorithm 1: per channel ``c``,

    y = (z - mean_c) / sqrt(var_c + eps) * weight_c + bias_c,

with the mean and the population variance (no Bessel correction) over the batch and spatial
dimensions. :func:`batch_norm` computes it as ``(z - mean) * scale + bias`` with
``scale = weight / sqrt(var + eps)``: the same function as ``F.batch_norm(..., training=True)``
up to rounding (``tests/test_norm.py``: float64, values, gradients and second derivatives).

Why (issue 13): under :func:`torch.func.vmap`, PyTorch's batch-norm rule folds the task dimension
into the channels (``[B, N, C, H, W] -> [N, B*C, H, W]``), which costs a layout copy per call, and
its backward and double backward on the folded tensor are slow on CPU. Reductions and elementwise
operations keep the task dimension where it is. NPBML's batched inner loop runs its adapted blocks
(:mod:`.film`) and warps (:mod:`.warp`) through this function; a BatchNorm that tracks
running statistics keeps PyTorch's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["batch_norm", "spatial_mean"]


def batch_norm(bn: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``bn(z)`` for a ``BatchNorm1d/2d/3d`` ``bn`` without running statistics (batch
    statistics in training and evaluation alike, as :class:`~npbml.models.Conv4`'s), from
    reductions and elementwise operations when ``z`` is channels-innermost (or has no spatial
    extent); any other ``bn`` (running statistics, a different norm layer) or an NCHW ``z`` is
    simply called.

    Args:
        bn: the normalisation layer (its ``weight``/``bias`` may be swapped in by
            ``torch.func.functional_call``).
        z: activation ``[N, C, *spatial]``.

    Returns:
        The normalised activation, ``z``'s shape.
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is not None:
        return bn(z)
    if z.dim() < 2 or z.shape[1] != bn.num_features or z.numel() == z.shape[1]:
        return bn(z)  # PyTorch's own errors: a wrong shape, one value per channel
    if z.dim() > 2 and z.stride(1) != 1:
        # NCHW (readable under vmap): per-channel reductions and broadcasts over the trailing
        # spatial dims are slow in this layout either way, and PyTorch's kernel is no slower
        # (the demo's max-pool Conv4, whose adapted conv is not unfolded)
        return bn(z)
    # Two passes (the mean, then the variance of z - mean), each one reduction over all
    # non-channel dims of the [N, *spatial, C] view: its logical order is the memory order of
    # channels-innermost z (the adapted blocks' layout, layers.unfold and layers.warp), where a
    # reduction over the channel-strided [N, C, *spatial] view is up to 5x slower (14x14 maps).
    zl = z.movedim(1, -1) if z.dim() > 2 else z
    dims = tuple(range(zl.dim() - 1))
    n = z.numel() // z.shape[1]
    d = zl - zl.sum(dims, keepdim=True) / n
    inv = torch.rsqrt((d * d).sum(dims, keepdim=True) / n + bn.eps)
    out = d * inv if bn.weight is None else d * (inv * bn.weight) + bn.bias
    return out.movedim(-1, 1) if z.dim() > 2 else out


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial dimensions, ``[N, C, *spatial] -> [N, C]`` (``x`` itself when it
    has none), as ``x.mean(dim=(2, ...))``.

    For a channels-innermost ``x`` (the adapted blocks' layout, :mod:`.unfold`) the mean is
    taken over the ``[N, *spatial, C]`` view. The values are the same; the point is the
    gradient: a mean's backward broadcasts the output gradient over the reduced dimensions, and
    PyTorch lays out the result of that broadcast in the order of the logical dimensions. In
    ``[N, C, H, W]`` order that is NCHW, which then meets channels-innermost activations in every
    backward operation of the inner loop (slow mixed-layout operations and copies, issue 13); in
    ``[N, H, W, C]`` order it is channels-innermost too.

    Args:
        x: ``[N, C, *spatial]`` (or ``[N, C]``).

    Returns:
        ``[N, C]``.
    """
    if x.dim() <= 2:
        return x
    if x.stride(1) == 1 and x.shape[1] > 1:  # channels innermost (readable under vmap)
        return x.movedim(1, -1).mean(dim=tuple(range(1, x.dim() - 1)))
    return x.mean(dim=tuple(range(2, x.dim())))
