"""Relation network (Sung et al., "Learning to Compare: Relation Network for Few-Shot Learning",
CVPR 2018): the frozen scorer behind NPBML's transductive loss term L_Q.

NPBML (Raymond et al., arXiv 2406.07983; docs/methods/npbml.md) feeds its query loss network with
relation scores ``r [Q, N]`` in ``[0, 1]``: how much each query resembles each support class. The
relation network is pre-trained separately (:func:`npbml.pretrain.pretrain_relation`, MSE to the
one-hot query labels, episodic, as Sung et al. eq. 3) and frozen during NPBML meta-training.

Architecture. An embedding module ``f`` maps images to feature maps; class prototypes are the
mean embedding of each class's support images (Sung et al. sum them; the mean keeps the scale
independent of the shot count); the relation module ``g`` scores the channel-wise concatenation
``[f(query), prototype]`` with two conv3x3-BN-ReLU-maxpool blocks, global average pooling and an
MLP ``C -> hidden -> 1`` with a sigmoid. Pooling uses ``ceil_mode`` and the final pooling is
global, so any feature-map size (down to 1x1, or flat ``[B, D]`` features) works.

Two inputs. ``reads="images"`` (default) is Sung et al.'s network with its own embedding module.
``reads="features"`` is the relation module alone, on the frozen features of the first
``feature_blocks`` blocks of NPBML's pre-trained backbone: the embedding NPBML already computes
for every episode, so the scores cost only the relation module (issue 13; the NPBML reference code
has no relation network at all, docs/npbml.md row 20).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from npbml.layout import run_channels_last

RELATION_FORMAT = "npbml-relation"


def conv_embedding(
    in_channels: int = 1, hidden: int = 64, depth: int = 4, pooled_blocks: int = 2
) -> nn.Sequential:
    """Sung et al.'s embedding module: ``depth`` conv3x3-BN-ReLU blocks, 2x2 max-pooling after
    the first ``pooled_blocks`` of them."""
    if depth < 1 or hidden < 1 or in_channels < 1:
        raise ValueError(
            f"conv_embedding needs positive sizes: in={in_channels} hidden={hidden} depth={depth}"
        )
    layers: list[nn.Module] = []
    c = in_channels
    for i in range(depth):
        layers += [
            nn.Conv2d(c, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(inplace=True),  # on a fresh BN output: no extra buffer, same gradient
        ]
        if i < pooled_blocks:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        c = hidden
    return nn.Sequential(*layers)


class RelationNetwork(nn.Module):
    """Relation network: ``scores = net(support_x, support_y, query_x, ways)`` -> ``[Q, N]`` in
    ``[0, 1]``.

    Args:
        encoder: embedding module (images -> ``[B, C, H, W]`` or ``[B, C]``); default
            :func:`conv_embedding` with ``in_channels`` and ``channels``.
        channels: channel count ``C`` of the encoder output (needed to size the relation module).
        in_channels: image channels of the default encoder.
        hidden: width of the relation module's hidden FC layer (8 in Sung et al.).
        reads: ``"images"`` (the default encoder embeds images) or ``"features"`` (the inputs
            are already embedded: the default encoder is the identity).
        feature_blocks: with ``reads="features"``, how many leading backbone blocks made the
            features; :class:`~npbml.algorithms.NPBML` checks it against its frozen blocks.
        encoder_blocks: with ``reads="features"``, conv3x3-BN-ReLU blocks of the network's own
            (``channels`` wide, no pooling) between the frozen features and the relation module:
            a learned embedding for comparing, where the backbone's was learned for classifying.
            ``0`` (default) scores the features as they are.
    """

    def __init__(
        self,
        encoder: nn.Module | None = None,
        channels: int = 64,
        in_channels: int = 1,
        hidden: int = 8,
        reads: str = "images",
        feature_blocks: int | None = None,
        encoder_blocks: int = 0,
    ) -> None:
        super().__init__()
        if reads not in ("images", "features"):
            raise ValueError(f"reads must be 'images' or 'features', got {reads!r}")
        if int(encoder_blocks) < 0 or (encoder_blocks and reads != "features"):
            raise ValueError(
                "encoder_blocks (own blocks on top of backbone features) must be >= 0 and needs "
                f"reads='features', got encoder_blocks={encoder_blocks!r} with reads={reads!r}"
            )
        if reads == "features" and (feature_blocks is None or int(feature_blocks) < 1):
            raise ValueError(
                "a relation network that reads backbone features needs feature_blocks >= 1 "
                f"(how many leading blocks made them), got {feature_blocks!r}"
            )
        self.channels = int(channels)
        self.reads = reads
        self.feature_blocks = None if feature_blocks is None else int(feature_blocks)
        # Constructor arguments, enough to rebuild the network from a checkpoint (default encoder).
        self.config: dict[str, Any] = {
            "channels": self.channels,
            "in_channels": int(in_channels),
            "hidden": hidden,
        }
        if reads == "features":
            self.config.update(reads=reads, feature_blocks=self.feature_blocks)
        if encoder_blocks:
            self.config.update(encoder_blocks=int(encoder_blocks))
        self.has_default_encoder = encoder is None
        if encoder is None:
            if reads == "images":
                encoder = conv_embedding(in_channels, channels)
            elif encoder_blocks:
                encoder = conv_embedding(channels, channels, int(encoder_blocks), pooled_blocks=0)
            else:
                encoder = nn.Identity()
        self.encoder = encoder

        def block(cin: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, self.channels, 3, padding=1),
                nn.BatchNorm2d(self.channels, track_running_stats=False),
                nn.ReLU(inplace=True),  # on a fresh BN output: no extra buffer, same gradient
                nn.MaxPool2d(2, ceil_mode=True),
            ]

        self.relation = nn.Sequential(*block(2 * self.channels), *block(self.channels))
        self.score = nn.Sequential(
            nn.Linear(self.channels, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid()
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps ``[B, C, H, W]`` (flat encoder outputs become ``[B, C, 1, 1]``)."""
        own = self.has_default_encoder and not isinstance(self.encoder, nn.Identity)
        if x.device.type == "cpu" and own:
            # CPU convolutions and max-pooling are much faster channels-last; a 1-channel input
            # cannot signal that layout (it is NCHW and NHWC at once), so the weights carry it
            # (npbml.layout: 5x for the 1-channel first convolution at 28x28).
            h = run_channels_last(self.encoder, None, x)
        else:
            h = self.encoder(x)
        if h.dim() == 2:
            h = h[:, :, None, None]
        if h.dim() != 4 or h.shape[1] != self.channels:
            raise ValueError(
                f"the relation encoder must output [B, {self.channels}, H, W] (or [B, "
                f"{self.channels}]), got {tuple(h.shape)}; set channels= to its output width"
            )
        return h

    def forward(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        ways: int | None = None,
    ) -> torch.Tensor:
        """Relation scores ``[Q, N]`` of each query against each support class prototype."""
        if support_x.shape[0] != support_y.shape[0]:
            raise ValueError(
                f"support_x has {support_x.shape[0]} examples, support_y {support_y.shape[0]}"
            )
        n = int(support_y.max()) + 1 if ways is None else int(ways)
        counts = torch.bincount(support_y, minlength=n)
        if counts.numel() != n or bool((counts == 0).any()):
            raise ValueError(
                f"every one of the {n} classes needs a support example (labels 0..{n - 1}); "
                f"got label counts {counts.tolist()}"
            )
        # Support and query embedded in one pass: BatchNorm statistics over the whole episode.
        emb = self.embed(torch.cat([support_x, query_x]))
        s, q = emb[: support_x.shape[0]], emb[support_x.shape[0] :]
        protos = torch.zeros((n,) + s.shape[1:], dtype=s.dtype, device=s.device)
        protos = protos.index_add(0, support_y, s) / counts.to(s.dtype).view(-1, 1, 1, 1)
        nq = q.shape[0]
        h = self.relate(q, protos).mean(dim=(2, 3))
        return self.score(h).view(nq, n)

    def relate(self, q: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """The relation module ``g`` on every (query, prototype) pair: ``[Q * N, C, h, w]``,
        pair ``i * N + j`` for query ``i`` and class ``j``.

        ``g`` starts with a convolution of the concatenation ``[q_i; p_j]``. A zero-padded
        convolution is linear, so ``conv([q; p]) = conv_q(q) + conv_p(p)`` with the weight split
        by input channels: the first convolution runs on the ``Q + N`` feature maps and the
        ``Q x N`` sums are formed after it, instead of convolving ``Q x N`` concatenations
        (``N`` times fewer FLOPs in the largest layer; the same function up to rounding,
        tested against the explicit pairs). Other first layers take the explicit pairs.
        """
        first = self.relation[0]
        if (
            not isinstance(first, nn.Conv2d)
            or first.groups != 1
            or first.padding_mode != "zeros"
            or first.in_channels != 2 * q.shape[1]
        ):
            pairs = _pairs(q, protos)
            return self.relation(_channels_last(pairs) if pairs.is_cpu else pairs)
        c = q.shape[1]
        if q.is_cpu:
            q, protos = _channels_last(q), _channels_last(protos)
        conv = functools.partial(
            F.conv2d,
            stride=first.stride,
            padding=first.padding,
            dilation=first.dilation,
        )
        a_q = conv(q, first.weight[:, :c])
        a_p = conv(protos, first.weight[:, c:], first.bias)
        h = (a_q.unsqueeze(1) + a_p.unsqueeze(0)).flatten(0, 1)
        if h.is_cpu:
            h = _channels_last(h)
        return self.relation[1:](h)


def _pairs(q: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """The explicit ``[Q * N, 2C, H, W]`` concatenations ``[q_i; p_j]`` (query first)."""
    nq, n = q.shape[0], protos.shape[0]
    return torch.cat(
        [
            q.unsqueeze(1).expand(nq, n, *q.shape[1:]),
            protos.unsqueeze(0).expand(nq, n, *protos.shape[1:]),
        ],
        dim=2,
    ).flatten(0, 1)


def _channels_last(h: torch.Tensor) -> torch.Tensor:
    return h.contiguous(memory_format=torch.channels_last) if h.dim() == 4 else h


def save_relation(net: RelationNetwork, path: str | Path, **meta: Any) -> Path:
    """Write a relation network (default encoder only) to ``path`` with extra ``meta`` entries."""
    from npbml.checkpoint import save_checkpoint

    if not net.has_default_encoder:
        raise ValueError(
            "save_relation rebuilds networks with the default encoder only; save a custom-encoder "
            "network's state_dict yourself"
        )
    state = {"format": RELATION_FORMAT, "config": dict(net.config), "state_dict": net.state_dict()}
    return save_checkpoint(path, {**meta, **state})


def load_relation(path: str | Path, map_location: str | torch.device = "cpu") -> RelationNetwork:
    """Rebuild a :class:`RelationNetwork` written by :func:`save_relation`."""
    from npbml.checkpoint import CheckpointError, load_checkpoint

    state = load_checkpoint(path, map_location)
    if state.get("format") != RELATION_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a relation-network checkpoint (write one with "
            "`npbml pretrain-relation` or npbml.algorithms.npbml.layers.relation.save_relation)"
        )
    net = RelationNetwork(**state["config"])
    net.load_state_dict(state["state_dict"])
    return net
