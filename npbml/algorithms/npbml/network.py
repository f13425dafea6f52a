"""NPBML's network: the backbone with FiLM-modulated blocks, warp layers and a shared head row.

Raymond et al., "Meta-Learning Neural Procedural Biases", arXiv 2406.07983 (docs/methods/npbml.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from npbml.algorithms.npbml.layers.film import (
    FiLMGenerator,
    block_channels,
    film_block_forward,
    film_points,
    unfolded_block_forward,
)
from npbml.algorithms.npbml.layers.norm import spatial_mean
from npbml.algorithms.npbml.layers.unfold import Unfolded
from npbml.algorithms.npbml.layers.warp import WarpLayer
from npbml.params import match_names

__all__ = ["HeadRow", "NPBMLNetwork", "adapt_and_freeze", "block_adapted_names", "block_frozen"]


class HeadRow(nn.Module):
    """Permutation-invariant head initialisation: one row ``w [F]`` and bias ``b []`` shared by
    all ``N`` classes (docs/methods/npbml.md). :meth:`expand` returns ``(W [N, F], bias [N])`` as
    views of the parameters, so the meta-gradient of each row flows into ``w``, ``b``.

    Starts at zero (all logits equal, so the initial prediction is uniform whatever the row);
    :meth:`from_linear` starts it at the mean row of a (pre-trained) linear layer instead.
    """

    def __init__(self, features: int, ways: int) -> None:
        super().__init__()
        if features < 1 or ways < 2:
            raise ValueError(f"HeadRow needs features >= 1 and ways >= 2, got {features}, {ways}")
        self.ways = int(ways)
        self.weight = nn.Parameter(torch.zeros(int(features)))
        self.bias = nn.Parameter(torch.zeros(()))

    def expand(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W [N, F], bias [N])``: every row the shared row (differentiable views)."""
        return (
            self.weight.unsqueeze(0).expand(self.ways, -1),
            self.bias.expand(self.ways),
        )

    @torch.no_grad()
    def from_linear(self, linear: nn.Linear) -> HeadRow:
        """Set the row to the mean row (and mean bias) of ``linear``; returns self."""
        self.weight.copy_(linear.weight.mean(0))
        if linear.bias is not None:
            self.bias.copy_(linear.bias.mean())
        return self

    def extra_repr(self) -> str:
        return f"features={self.weight.numel()}, ways={self.ways}"


class NPBMLNetwork(nn.Module):
    """The backbone with FiLM-modulated blocks, warp layers and (optionally) a head row.

    Holds ``model.blocks`` and ``model.head`` by reference, so parameter names are the model's
    (``blocks.3.conv.weight``, ``head.weight``) next to ``films.<i>.*``, ``warps.<i>.*`` and
    ``head_row.*``. The model needs ``blocks`` (an ``nn.Sequential`` of blocks) and a linear
    ``head``; block outputs are flattened, or averaged over space when the flat size does not
    match the head (as Conv4 "strided" / ResNet12 "avg" do).

    With a head row, the head's own weights are placeholders: :class:`NPBML` always passes the
    head tensors (expanded from the row, or adapted) in the parameter dict.
    """

    def __init__(
        self,
        model: nn.Module,
        film_blocks: Sequence[int] = (),
        warp_after: Sequence[int] = (),
        warp_film: bool = True,
        film_init_std: float = 0.01,
        head_row: bool = False,
        warp_bn: bool = False,
        film_per_conv: bool = False,
    ) -> None:
        super().__init__()
        blocks = getattr(model, "blocks", None)
        head = getattr(model, "head", None)
        if not isinstance(blocks, nn.Sequential) or not isinstance(head, nn.Linear):
            raise TypeError(
                "NPBML needs a backbone with `blocks` (nn.Sequential) and a linear `head`, like "
                f"npbml.models.Conv4/ResNet12; got {type(model).__name__}"
            )
        self.blocks = blocks
        self.head = head
        n = len(blocks)
        film_idx = sorted({self._index(i, n, "film_blocks") for i in film_blocks})
        warp_idx = sorted({self._index(i, n, "warp_after") for i in warp_after})
        self.films = nn.ModuleDict(
            {
                str(i): _generator(blocks[i], film_per_conv, film_init_std)
                for i in film_idx
            }
        )
        self.warps = nn.ModuleDict(
            {
                str(i): WarpLayer(
                    block_channels(blocks[i])[1], warp_film, film_init_std, bn=warp_bn
                )
                for i in warp_idx
            }
        )
        self.head_row = HeadRow(head.in_features, head.out_features) if head_row else None

    @staticmethod
    def _index(i: int, n: int, what: str) -> int:
        if not -n <= int(i) < n:
            raise ValueError(f"{what}: block index {i} out of range for {n} blocks")
        return int(i) % n

    def block_forward(self, i: int, h: torch.Tensor | Unfolded) -> torch.Tensor:
        """Block ``i`` with its FiLM generator and the warp after it, if any; ``h`` may come
        :class:`~.layers.unfold.Unfolded` for the block's first convolution."""
        key = str(i)
        if key in self.films:
            generator = cast(FiLMGenerator, self.films[key])  # films holds _generator()s only
            out = film_block_forward(self.blocks[i], generator, h)
        elif isinstance(h, Unfolded):
            out = unfolded_block_forward(self.blocks[i], h)
        else:
            out = self.blocks[i](h)
        if key in self.warps:
            out = self.warps[key](out)
        return out

    def run_blocks(
        self, x: torch.Tensor | Unfolded, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Activations after blocks ``start .. stop-1`` given the input of block ``start``."""
        stop = len(self.blocks) if stop is None else stop
        for i in range(start, stop):
            x = self.block_forward(i, x)
        return x.x if isinstance(x, Unfolded) else x

    def reduce(self, h: torch.Tensor) -> torch.Tensor:
        """Final block output -> head features (flatten, or spatial mean, to match the head)."""
        if math.prod(h.shape[1:]) == self.head.in_features:  # before flatten: it copies a CL map
            return h.flatten(1)
        if h.dim() == 4 and h.shape[1] == self.head.in_features:
            return spatial_mean(h)  # its gradient keeps a channels-innermost layout
        raise ValueError(
            f"block output {tuple(h.shape)} fits neither flattened nor pooled the head's "
            f"{self.head.in_features} input features; check the image size of the model"
        )

    def forward(self, x: torch.Tensor | Unfolded, start: int = 0) -> torch.Tensor:
        """Logits; ``start > 0`` means ``x`` is the (precomputed) input of block ``start``,
        possibly :class:`~.layers.unfold.Unfolded` for its first convolution."""
        return self.head(self.reduce(self.run_blocks(x, start)))


def _generator(block: nn.Module, per_conv: bool, init_std: float) -> FiLMGenerator:
    """FiLM generator of one block: reads the pooled block input, one gamma/beta pair per FiLM
    point (one per conv of a residual block with ``per_conv``, as the reference code)."""
    c_in, c_out = block_channels(block)
    return FiLMGenerator(c_in, film_points(block, per_conv) * c_out, init_std=init_std)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def block_adapted_names(block: nn.Module, prefix: str, adapt_bn: bool = False) -> list[str]:
    """The reference code's adapted tensors of one block: conv and linear weights, linear
    biases, normalisation affine only with ``adapt_bn``; never a conv bias (it feeds a
    BatchNorm, which removes it: zero gradient, yet it would be an input of R).

    Args:
        block: the block (e.g. ``model.blocks[-1]``).
        prefix: its name in the network, e.g. ``"blocks.3."``.
        adapt_bn: include the affine parameters of normalisation layers.

    Returns:
        Full parameter names (``prefix`` + the name inside the block).
    """
    names = []
    for mod_name, mod in block.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            if isinstance(mod, _NORMS):
                keep = adapt_bn
            elif isinstance(mod, nn.modules.conv._ConvNd):
                keep = p_name == "weight"
            else:
                keep = True
            if keep:
                names.append(prefix + (f"{mod_name}." if mod_name else "") + p_name)
    return names


def _pats(p: str | Sequence[str]) -> tuple[str, ...]:
    return (p,) if isinstance(p, str) else tuple(p)


def block_frozen(blocks: nn.Sequential, i: int, freeze: Sequence[str]) -> bool:
    """True when every parameter of block ``i`` matches a ``freeze`` pattern."""
    names = [f"blocks.{i}.{n}" for n, _ in blocks[i].named_parameters()]
    return bool(names) and len(match_names(names, freeze)) == len(names)


def adapt_and_freeze(
    blocks: nn.Sequential,
    adapt: str | Sequence[str] | None,
    freeze: str | Sequence[str] | None,
    use_film: bool,
    adapt_bn: bool,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(adapt, freeze)`` patterns for :class:`~npbml.algorithms.base.GradientLearner`.

    ``adapt=None`` is the reference choice (docs/methods/npbml.md, "Which weights adapt"): the last
    block (:func:`block_adapted_names`), its FiLM generator and the head adapt; the earlier
    blocks are frozen unless ``freeze`` says otherwise. Explicit ``adapt`` patterns come with an
    empty default ``freeze``.
    """
    if len(blocks) == 0:
        raise TypeError("NPBML needs a backbone with non-empty `blocks` (nn.Sequential)")
    last = len(blocks) - 1
    if adapt is not None:
        return _pats(adapt), (() if freeze is None else _pats(freeze))
    adapt_p = (*block_adapted_names(blocks[last], f"blocks.{last}.", adapt_bn), "head.*")
    if use_film:
        adapt_p += (f"films.{last}.*",)
    freeze_p = tuple(f"blocks.{i}.*" for i in range(last)) if freeze is None else _pats(freeze)
    return adapt_p, freeze_p
