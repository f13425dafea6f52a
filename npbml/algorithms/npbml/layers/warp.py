"""Warp preconditioning layers: NPBML's meta-learned optimizer omega (T-Net / WarpGrad style).

NPBML (Raymond et al., arXiv 2406.07983; docs/methods/npbml.md) meta-learns a gradient
preconditioner ``P(omega, psi)`` in the inner rule

    theta_{j+1} = theta_j - alpha * P(omega, psi) * grad_theta M(theta_j).

Following T-Net (Lee & Choi, ICML 2018) and WarpGrad (Flennerhag et al., ICLR 2020), ``P`` is not
applied to gradients explicitly: linear *warp* layers are interleaved with the adapted layers in
the forward pass, are meta-learned only (the inner loop never updates them), and thereby
precondition the gradients of the layers before them.

Why a warp preconditions. Let a task layer produce ``h = W x`` and the warp ``z = Omega h``
(Omega linear, fixed in the inner loop). Then ``dL/dW = Omega^T (dL/dz) x^T``, and the SGD step
``W' = W - alpha dL/dW`` changes the warped output by
``Omega dW x = -alpha (Omega Omega^T) (dL/dz) (x^T x)``: a step along the output-space gradient
preconditioned by ``Omega Omega^T``. A 3x3 convolution acting on channels is block-diagonal over
spatial positions, so the induced preconditioner is block-diagonal too. With ``Omega = I``
(``torch.nn.init.dirac_``) the update is exactly plain SGD; the tests check this.

The warp here is a conv3x3 ``C -> C`` with no bias and no nonlinearity, optionally followed by
BatchNorm (batch statistics, as the reference code's conv -> BN -> FiLM warp block) and
optionally FiLM-modulated (``FiLM(BN(Omega h); GAP(h))``) so the preconditioner is task-adaptive.
Without BN and FiLM a Dirac warp is exactly the identity. With BN it standardises each channel
over the batch, and the induced preconditioner also contains BN's (batch-dependent) Jacobian;
the inner loop still never updates the warp.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from npbml.algorithms.npbml.layers.film import FiLMGenerator, global_context
from npbml.algorithms.npbml.layers.norm import batch_norm


def warp_conv(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(h, weight, padding=k // 2)``; on maps with fewer positions than the kernel has
    taps (2x2 or 1x1 under a 3x3 kernel, as after NPBML's last block) as one product with the
    convolution's dense matrix instead.

    On such maps most taps read the zero padding: for ``C`` channels and ``P = H * W`` positions
    the dense map costs ``(C P)^2`` multiply-adds per example against the convolution's
    ``9 C^2 P``, and a matrix product has none of a small convolution's overhead (issue 13,
    docs/benchmarks.md). The matrix is gathered from the kernel's entries
    (:func:`dense_conv_matrix`), so it is exact and differentiable in ``weight``.

    Args:
        h: ``[N, C, H, W]``.
        weight: ``[C_out, C, kh, kw]``, ``kh`` and ``kw`` odd.

    Returns:
        ``[N, C_out, H, W]``.
    """
    n, _, height, width = h.shape
    kh, kw = weight.shape[-2:]
    if height * width >= kh * kw:
        return F.conv2d(h, weight, padding=(kh // 2, kw // 2))
    # Rows and columns of the dense matrix in (y, x, channel) order, so that a channels-innermost
    # h (the adapted block's output, layers.unfold) is read as a view and the output comes back
    # channels-innermost too: per-channel BatchNorm and FiLM after the warp are fast in that
    # layout and slow on NCHW maps of 2x2 or 1x1 (npbml.algorithms.npbml.layers.norm).
    out = h.permute(0, 2, 3, 1).reshape(n, -1) @ dense_conv_matrix(weight, height, width)
    return out.view(n, height, width, -1).permute(0, 3, 1, 2)


def dense_conv_matrix(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The ``"same"``-padded convolution with ``weight`` on ``height x width`` maps as a matrix.

    Entry ``[(yi, xi, ci), (yo, xo, co)]`` is ``weight[co, ci, yi - yo + kh // 2,
    xi - xo + kw // 2]`` (zero where that tap is off the kernel): the cross-correlation of
    ``F.conv2d``. A gather of the kernel's entries, not a convolution of unit inputs: the same
    matrix exactly, at a fraction of the work, and its gradient is the sum over the entries
    each kernel tap feeds.

    Args:
        weight: ``[C_out, C_in, kh, kw]``.
        height, width: the map size.

    Returns:
        ``[height * width * C_in, height * width * C_out]``, for row vectors of
        channels-innermost inputs.
    """
    c_out, c_in, kh, kw = weight.shape
    p = height * width
    taps = _taps(height, width, kh, kw, weight.device)
    table = weight.permute(2, 3, 1, 0).reshape(kh * kw, c_in, c_out)
    table = torch.cat([table, table.new_zeros(1, c_in, c_out)])  # the last entry: no tap
    dense = table[taps].view(p, p, c_in, c_out).permute(0, 2, 1, 3)
    return dense.reshape(p * c_in, p * c_out)


@functools.lru_cache(maxsize=64)
def _taps(height: int, width: int, kh: int, kw: int, device: torch.device) -> torch.Tensor:
    """For each (input position, output position) pair, row-major, the flat kernel tap that
    connects them, or ``kh * kw`` where none does. Kept per device: a host-to-GPU copy at every
    call would synchronise."""
    positions = [(y, x) for y in range(height) for x in range(width)]
    out = []
    for yi, xi in positions:
        for yo, xo in positions:
            ky, kx = yi - yo + kh // 2, xi - xo + kw // 2
            out.append(ky * kw + kx if 0 <= ky < kh and 0 <= kx < kw else kh * kw)
    return torch.tensor(out, device=device)


class WarpLayer(nn.Module):
    """One warp layer: ``z = FiLM(conv3x3(h); GAP(h))`` with a Dirac (identity) initial kernel.

    Args:
        channels: number of channels ``C`` of the activation it warps (``C -> C``).
        film: FiLM-modulate the warp output (generator reads the pooled warp input).
        film_init_std: std of the FiLM generator's initial weights (0 -> exact identity).
        kernel_size: odd kernel size (3 in NPBML).
        bn: BatchNorm (batch statistics, learnable affine) between the conv and FiLM.
    """

    def __init__(
        self,
        channels: int,
        film: bool = True,
        film_init_std: float = 0.01,
        kernel_size: int = 3,
        bn: bool = False,
    ) -> None:
        super().__init__()
        if channels <= 0:
            raise ValueError(f"WarpLayer needs a positive channel count, got {channels}")
        if kernel_size % 2 != 1:
            raise ValueError(f"WarpLayer kernel_size must be odd, got {kernel_size}")
        self.channels = int(channels)
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.dirac_(self.conv.weight)
        self.bn = nn.BatchNorm2d(channels, track_running_stats=False) if bn else None
        self.film = FiLMGenerator(channels, channels, film_init_std) if film else None
        #: :func:`warp_conv` (the same math); False: always ``F.conv2d`` (for A/B timings).
        self.dense_small_maps = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 4 or h.shape[1] != self.channels:
            raise ValueError(
                f"WarpLayer({self.channels}) expects activations [B, {self.channels}, H, W], got "
                f"{tuple(h.shape)}; place warps after conv blocks with that many channels"
            )
        if self.dense_small_maps:
            z = warp_conv(h, self.conv.weight)
        else:
            z = F.conv2d(h, self.conv.weight, padding=self.conv.padding)
        if self.bn is not None:
            z = batch_norm(self.bn, z)  # layers.norm: no layout copy under vmap
        if self.film is not None:
            z = self.film.modulate(z, global_context(h))
        return z

    def extra_repr(self) -> str:
        return f"channels={self.channels}, film={self.film is not None}, bn={self.bn is not None}"
