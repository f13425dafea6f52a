"""The 4-block convolutional backbone of few-shot learning ("4-CONV").

Vinyals et al. 2016 / Finn et al. 2017 (MAML, section 5.2): four blocks of 3x3 convolution with
``hidden`` filters, batch normalisation and ReLU, followed by 2x2 max-pooling ("maxpool", the
mini-ImageNet variant) or with stride-2 convolutions instead of pooling and a final spatial mean
("strided", MAML's Omniglot variant, as in learn2learn's OmniglotCNN). A linear ``head`` maps the
features to ``num_classes`` logits.

BatchNorm uses the statistics of the current batch (``track_running_stats=False``), as in MAML
(docs/methods/protocol.md), so the same forward is used at meta-train and meta-test time.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Conv4", "ConvBlock"]


class ConvBlock(nn.Module):
    """conv3x3 -> BatchNorm -> ReLU (-> maxpool 2x2): one block of :class:`Conv4`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        pool: bool = True,
        track_running_stats: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        # MAML's reference initialisation: Xavier-uniform conv weights, zero biases.
        nn.init.xavier_uniform_(self.conv.weight)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        if not torch.is_grad_enabled() and type(self.relu) is nn.ReLU:
            # no graph (frozen features, evaluation): ReLU in place on BatchNorm's fresh output,
            # one full-size buffer fewer per block (issue 13); the same values
            return self.pool(torch.relu_(h))
        return self.pool(self.relu(h))


class Conv4(nn.Module):
    """4-CONV backbone with a linear head; parameters ``blocks.{0..3}.{conv,bn}.*``, ``head.*``.

    ``variant="maxpool"``: stride-1 convs and 2x2 max-pooling, flattened features
    (``hidden * s * s`` with ``s = image_size // 16``, e.g. 64 for 28x28, 1600 for 84x84).
    ``variant="strided"``: stride-2 convs, no pooling, features averaged over space (``hidden``).
    ``pool="avg"`` averages the maxpool variant's last maps over space too (``hidden``
    features: the NPBML reference code's global-average-pooled head, 48-d at 84x84 instead of
    1200-d); ``pool="flatten"`` flattens them. Default: ``"flatten"`` for maxpool, ``"avg"`` for
    strided. ``conv_bias=False`` drops the conv biases, which the BatchNorm after each conv
    cancels anyway (NPBML's reference code has none; MAML's and learn2learn's have them).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        hidden: int = 64,
        image_size: int = 28,
        variant: str = "maxpool",
        track_running_stats: bool = False,
        pool: str | None = None,
        conv_bias: bool = True,
    ) -> None:
        super().__init__()
        if variant not in ("maxpool", "strided"):
            raise ValueError(f"Conv4 variant must be 'maxpool' or 'strided', got {variant!r}")
        strided = variant == "strided"
        pool = pool or ("avg" if strided else "flatten")
        if pool not in ("flatten", "avg") or (strided and pool != "avg"):
            raise ValueError(
                f"Conv4 pool must be 'flatten' or 'avg' (only 'avg' for variant='strided'), got "
                f"{pool!r}"
            )
        for name, v in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("hidden", hidden),
            ("image_size", image_size),
        ):
            if int(v) < 1:
                raise ValueError(f"Conv4 {name} must be a positive integer, got {v!r}")
        side = int(image_size)
        if not strided:
            for _ in range(4):
                side //= 2
            if side < 1:
                raise ValueError(
                    f"Conv4(variant='maxpool') needs image_size >= 16 (four 2x2 poolings), got "
                    f"{image_size}; use a larger image or variant='strided'"
                )
        self.variant = variant
        self.pool = pool
        self.hidden = int(hidden)
        self.image_size = int(image_size)
        chans = [int(in_channels)] + [self.hidden] * 4
        self.blocks = nn.Sequential(
            *(
                ConvBlock(
                    chans[i],
                    chans[i + 1],
                    stride=2 if strided else 1,
                    pool=not strided,
                    track_running_stats=track_running_stats,
                    bias=conv_bias,
                )
                for i in range(4)
            )
        )
        self.feature_dim = self.hidden if pool == "avg" else self.hidden * side * side
        self.head = nn.Linear(self.feature_dim, int(num_classes))
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flat per-example features ``[batch, feature_dim]`` (everything before ``head``)."""
        if x.dim() != 4:
            raise ValueError(f"Conv4 expects images [batch, C, H, W], got shape {tuple(x.shape)}")
        h = self.blocks(x)
        if self.pool == "avg":
            return h.mean(dim=(2, 3))
        return h.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
