"""FiLM task adaptation (feature-wise linear modulation) for NPBML.

NPBML (Raymond et al., "Meta-Learning Neural Procedural Biases", arXiv 2406.07983;
docs/methods/npbml.md) makes its meta-learned procedural biases task-adaptive with FiLM
(Perez et al., 2018):

    FiLM(h; c) = (1 + gamma(c)) * h + beta(c),

where ``gamma, beta`` come from a linear *generator* reading a context ``c``. The generator's
weights start ~ N(0, 0.01) and its bias at zero, so FiLM is ~ the identity at initialisation and
NPBML starts ~ MAML. The ``1 +`` parameterisation (rather than ``gamma * h``) is what makes a
near-zero generator an identity.

Three uses, all nn.Modules whose parameters are meta-parameters (psi):

* :class:`FiLMGenerator` - the bare generator ``c -> (gamma, beta)`` plus :func:`film`, usable in
  anyone's functional forward pass.
* :class:`FiLMBlock` - wraps an encoder block (conv-BN-ReLU-pool, a residual block, a linear
  block). The generator reads the global-average-pooled *block input* per sample; gamma/beta act
  after BatchNorm and before the first nonlinearity when the block is an ``nn.Sequential`` that
  has one, otherwise on the block output.
* :class:`FiLMLinear` - a linear layer modulated by its own input, used for every layer of the
  learned-loss MLPs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from npbml.algorithms.npbml.layers.norm import batch_norm, spatial_mean
from npbml.algorithms.npbml.layers.unfold import Unfolded, can_unfold, unfolded_conv

if TYPE_CHECKING:
    from npbml.models import ConvBlock, ResidualBlock

#: Modules treated as "the nonlinearity" when locating where FiLM acts inside a block.
NONLINEARITIES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
)


def film(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Apply ``(1 + gamma) * h + beta`` feature-wise.

    ``h`` is ``[B, C, *spatial]``; ``gamma`` and ``beta`` are ``[B, C]`` (one pair per sample) or
    ``[C]`` and are broadcast over the spatial dimensions, or have ``h``'s own shape (linear
    layers, ``[..., C]``).
    """
    if gamma.shape != beta.shape:
        raise ValueError(f"gamma {tuple(gamma.shape)} and beta {tuple(beta.shape)} differ in shape")
    # beta + (1 + gamma) * h as one addcmul: a pass over h fewer, in the forward and in every
    # backward through the inner loop (issue 13)
    if gamma.shape == h.shape:  # linear layers: [..., C] modulated elementwise
        return torch.addcmul(beta, 1.0 + gamma, h)
    if gamma.dim() == 1:  # one pair for all samples: [C] -> [1, C]
        gamma, beta = gamma.unsqueeze(0), beta.unsqueeze(0)
    if gamma.dim() != 2 or h.dim() < 2 or gamma.shape[-1] != h.shape[1]:
        raise ValueError(
            f"FiLM parameters of shape {tuple(gamma.shape)} do not fit features {tuple(h.shape)}; "
            "expected [B, C] (or [C]) for h of shape [B, C, ...]"
        )
    shape = gamma.shape + (1,) * (h.dim() - 2)
    gamma, beta = gamma.reshape(shape), beta.reshape(shape)
    return torch.addcmul(beta, 1.0 + gamma, h)


def global_context(x: torch.Tensor) -> torch.Tensor:
    """Per-sample context of an activation: global average pool ``[B, C, ...] -> [B, C]``
    (:func:`~.norm.spatial_mean`, which keeps a channels-innermost layout in the gradient)."""
    return spatial_mean(x)


class FiLMGenerator(nn.Module):
    """Linear generator ``context [B, in_features] -> (gamma, beta)``, each ``[B, num_features]``.

    Weights ~ N(0, ``init_std``) and zero bias (docs/methods/npbml.md: the generator weights start
    ~ N(0, 0.01); we read 0.01 as the standard deviation), so ``FiLM ~ identity`` at init.
    ``init_std=0`` gives an exact identity, which the tests use to check NPBML == MAML/SGD.
    """

    def __init__(self, in_features: int, num_features: int, init_std: float = 0.01) -> None:
        super().__init__()
        if in_features <= 0 or num_features <= 0:
            raise ValueError(
                f"FiLMGenerator needs positive sizes, got in_features={in_features}, "
                f"num_features={num_features}"
            )
        self.in_features = int(in_features)
        self.num_features = int(num_features)
        self.linear = nn.Linear(self.in_features, 2 * self.num_features)
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float = 0.01) -> None:
        """Weights ~ N(0, init_std), bias 0 (near-identity FiLM)."""
        nn.init.normal_(self.linear.weight, 0.0, init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if context.shape[-1] != self.in_features:
            raise ValueError(
                f"FiLMGenerator expects a context with {self.in_features} features, got shape "
                f"{tuple(context.shape)}"
            )
        gamma, beta = self.linear(context).chunk(2, dim=-1)
        return gamma, beta

    def modulate(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``FiLM(h; context)``."""
        gamma, beta = self(context)
        return film(h, gamma, beta)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_features={self.num_features}"


Modulate = Callable[..., torch.Tensor]  # modulate(h, k=0): FiLM point k of the block
BlockForward = Callable[[nn.Module, torch.Tensor, Modulate], torch.Tensor]

#: ``type -> f(block, x, modulate)``: how to run a block with FiLM applied at the right place.
_FILM_FORWARDS: dict[type, BlockForward] = {}
#: ``type -> (f, points)``: the variant with one FiLM per conv (``points`` of them, each with its
#: own gamma/beta), the reference code's placement for residual blocks.
_FILM_PER_CONV: dict[type, tuple[BlockForward, int]] = {}
#: Block types whose registered forward (:data:`_FILM_FORWARDS`) also accepts an
#: :class:`~.unfold.Unfolded` ``x`` (its first layer is ``block.conv`` reading ``x``).
_UNFOLDABLE: set[type] = set()


def register_film_forward(block_type: type, fn: BlockForward) -> None:
    """Teach :class:`FiLMBlock` where FiLM acts inside blocks of ``block_type``.

    ``fn(block, x, modulate)`` must run ``block`` on ``x`` and call ``modulate(h)`` once on the
    post-normalisation, pre-nonlinearity activation ``h``. Unregistered types are modulated at
    their output (or, for ``nn.Sequential``, before the first nonlinearity).
    """
    _FILM_FORWARDS[block_type] = fn


def _sequential_forward(block: nn.Module, x: torch.Tensor, modulate: Modulate) -> torch.Tensor:
    layers = list(cast(nn.Sequential, block))  # registered for nn.Sequential (exact type)
    split = next((i for i, m in enumerate(layers) if isinstance(m, NONLINEARITIES)), None)
    if split is None:
        return modulate(block(x))
    for layer in layers[:split]:
        x = layer(x)
    x = modulate(x)
    for layer in layers[split:]:
        x = layer(x)
    return x


def _conv_block_forward(
    block: nn.Module, x: torch.Tensor | Unfolded, modulate: Modulate
) -> torch.Tensor:
    # npbml.models.ConvBlock: conv -> BN -> [FiLM] -> ReLU -> pool; the conv from the patches when
    # the input comes unfolded (layers.unfold), BN from elementwise ops (layers.norm: no layout
    # copy under vmap)
    b = cast("ConvBlock", block)  # registered for ConvBlock (looked up by exact type)
    z = unfolded_conv(b.conv, x) if isinstance(x, Unfolded) else b.conv(x)
    return b.pool(b.relu(modulate(batch_norm(b.bn, z))))


def _residual_block_forward(block: nn.Module, x: torch.Tensor, modulate: Modulate) -> torch.Tensor:
    # npbml.models.ResidualBlock: FiLM after the last BN of the main path, before the residual
    # sum and its LeakyReLU (the TADAM placement for ResNets).
    b = cast("ResidualBlock", block)  # registered for ResidualBlock (looked up by exact type)
    h = b.act(b.bn1(b.conv1(x)))
    h = b.act(b.bn2(b.conv2(h)))
    h = modulate(b.bn3(b.conv3(h)))
    h = b.act(h + b.shortcut(x))
    return b.dropout(b.pool(h))


def _residual_per_conv_forward(
    block: nn.Module, x: torch.Tensor, modulate: Modulate
) -> torch.Tensor:
    # npbml.models.ResidualBlock with FiLM after each of the three BNs of the main path (the NPBML
    # reference code's AdaResNet: one FiLM per conv).
    b = cast("ResidualBlock", block)  # registered for ResidualBlock (looked up by exact type)
    h = b.act(modulate(b.bn1(b.conv1(x)), 0))
    h = b.act(modulate(b.bn2(b.conv2(h)), 1))
    h = modulate(b.bn3(b.conv3(h)), 2)
    h = b.act(h + b.shortcut(x))
    return b.dropout(b.pool(h))


def _register_defaults() -> None:
    if not _FILM_FORWARDS:
        from npbml.models import ConvBlock, ResidualBlock  # lazy: models never import film

        register_film_forward(nn.Sequential, _sequential_forward)
        register_film_forward(ConvBlock, _conv_block_forward)
        register_film_forward(ResidualBlock, _residual_block_forward)
        _FILM_PER_CONV[ResidualBlock] = (_residual_per_conv_forward, 3)
        _UNFOLDABLE.add(ConvBlock)


def unfoldable_conv(block: nn.Module) -> nn.Conv2d | None:
    """The convolution that reads ``block``'s input when the block can run from an
    :class:`~npbml.algorithms.npbml.layers.unfold.Unfolded` input (:func:`unfolded_block_forward`,
    :func:`film_block_forward`): ``npbml.models.ConvBlock``'s conv, if
    :func:`~npbml.algorithms.npbml.layers.unfold.can_unfold`; None for any other block."""
    _register_defaults()
    if type(block) not in _UNFOLDABLE:
        return None
    conv = getattr(block, "conv", None)
    return conv if isinstance(conv, nn.Conv2d) and can_unfold(conv) else None


def unfolded_block_forward(block: nn.Module, x: Unfolded) -> torch.Tensor:
    """``block(x.x)`` from the patches of its first convolution (no FiLM); ``block`` must have
    an :func:`unfoldable_conv`."""
    return _unfolded_forward_for(block)(block, x, _identity)


def _unfolded_forward_for(block: nn.Module) -> Callable[..., torch.Tensor]:
    _register_defaults()
    if type(block) not in _UNFOLDABLE:
        raise TypeError(
            f"a {type(block).__name__} cannot run from an Unfolded input (only "
            f"{sorted(t.__name__ for t in _UNFOLDABLE)}); pass the activation itself"
        )
    return _FILM_FORWARDS[type(block)]


def _identity(h: torch.Tensor, k: int = 0) -> torch.Tensor:
    return h


def _film_forward_for(block: nn.Module) -> BlockForward | None:
    _register_defaults()
    return _FILM_FORWARDS.get(type(block))


def film_points(block: nn.Module, per_conv: bool = False) -> int:
    """How many FiLM points (gamma/beta pairs of ``out_channels`` each) ``block`` gets: 1, or
    with ``per_conv`` one per conv of the main path for block types that support it."""
    _register_defaults()
    return _FILM_PER_CONV[type(block)][1] if per_conv and type(block) in _FILM_PER_CONV else 1


def block_channels(block: nn.Module) -> tuple[int, int]:
    """``(in_channels, out_channels)`` of a conv or linear block, read from its layers.

    Input width: the first Conv2d/Linear's input size. Output width: the last BatchNorm's
    ``num_features`` if any, else the last Conv2d/Linear's output size (residual blocks declare
    their shortcut after the main path in some codebases; its width equals the block's anyway).
    """
    first_in: int | None = None
    last_out: int | None = None
    last_norm: int | None = None
    for m in block.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            size_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            size_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            if first_in is None:
                first_in = size_in
            last_out = size_out
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.GroupNorm | nn.LayerNorm):
            last_norm = getattr(m, "num_features", None) or getattr(m, "num_channels", None)
    if first_in is None or last_out is None:
        raise ValueError(
            f"cannot infer the channels of block {type(block).__name__}: it has no Conv2d or "
            "Linear layer; pass in_channels/out_channels explicitly"
        )
    return first_in, int(last_norm) if last_norm else last_out


class FiLMBlock(nn.Module):
    """An encoder block with FiLM task adaptation (NPBML, docs/methods/npbml.md).

    The generator reads the global-average-pooled block *input* (per sample); gamma/beta act after
    BatchNorm and before the nonlinearity: for ``npbml.models.ConvBlock`` between BN and ReLU, for
    ``nn.Sequential`` before the first nonlinearity, for ``npbml.models.ResidualBlock`` after the
    last BN of the main path (before the residual sum), and for any other block type at the block
    output unless a placement is registered with :func:`register_film_forward`.

    The wrapped block is held by reference (not copied): its parameters stay the backbone's, and
    ``functional_call`` on a module containing this one addresses them as ``block.*``.
    """

    def __init__(
        self,
        block: nn.Module,
        in_channels: int | None = None,
        out_channels: int | None = None,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if in_channels is None or out_channels is None:
            cin, cout = block_channels(block)
            in_channels = cin if in_channels is None else in_channels
            out_channels = cout if out_channels is None else out_channels
        self.block = block
        self.generator = FiLMGenerator(in_channels, out_channels, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return film_block_forward(self.block, self.generator, x)


def film_block_forward(
    block: nn.Module, generator: FiLMGenerator, x: torch.Tensor | Unfolded
) -> torch.Tensor:
    """Run ``block`` on ``x`` with FiLM from ``generator`` (context: pooled ``x``), placed as
    described in :class:`FiLMBlock`. The functional core of FiLMBlock, for composite networks
    that keep blocks and generators in separate containers. ``x`` may come
    :class:`~.unfold.Unfolded` for a block with an :func:`unfoldable_conv`."""
    gamma, beta = generator(x.mean if isinstance(x, Unfolded) else global_context(x))
    width = gamma.shape[-1]

    def modulate(h: torch.Tensor, k: int = 0) -> torch.Tensor:
        c = h.shape[1] if h.dim() > 2 else h.shape[-1]
        if c == width:
            return film(h, gamma, beta)
        return film(h, gamma[..., k * c : (k + 1) * c], beta[..., k * c : (k + 1) * c])

    if isinstance(x, Unfolded):
        return _unfolded_forward_for(block)(block, x, modulate)
    fn = _film_forward_for(block)
    per_conv = _FILM_PER_CONV.get(type(block))
    if per_conv is not None and width == per_conv[1] * block_channels(block)[1]:
        fn = per_conv[0]
    if fn is None:
        return modulate(block(x))
    return fn(block, x, modulate)


class FiLMLinear(nn.Module):
    """Linear layer FiLM-modulated by its own input: ``FiLM(W x + b; x)``.

    Used for every layer of NPBML's loss MLPs (docs/methods/npbml.md: every linear layer is
    FiLM-modulated by its own input). The linear weights follow ``init_std`` too (the loss
    networks start ~ N(0, 0.01)); biases start at zero. With ``film=False`` it is a plain linear
    layer with the same initialisation (the "no FiLM" ablation rows).
    """

    def __init__(
        self, in_features: int, out_features: int, init_std: float = 0.01, film: bool = True
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        nn.init.normal_(self.linear.weight, 0.0, init_std)
        nn.init.zeros_(self.linear.bias)
        self.generator = FiLMGenerator(in_features, out_features, init_std) if film else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        if self.generator is None:
            return h
        return self.generator.modulate(h, x)
