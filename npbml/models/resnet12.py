"""ResNet-12 backbone (Lee et al., "Meta-Learning with Differentiable Convex Optimization"
(MetaOptNet), CVPR 2019; Oreshkin et al., TADAM, NeurIPS 2018).

Four residual blocks; each is three conv3x3-BN(-LeakyReLU 0.1) layers plus a 1x1-conv-BN shortcut,
then LeakyReLU and 2x2 max-pooling. Channels (64, 160, 320, 640). BatchNorm uses batch statistics
by default (docs/methods/protocol.md). DropBlock is replaced by optional plain dropout
(``drop_rate``).
Features: global average pooling (``pool="avg"``, 640-d) or flattening (``pool="flatten"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ResNet12", "ResidualBlock"]


class ResidualBlock(nn.Module):
    """MetaOptNet residual block: 3 x (conv3x3, BN) with LeakyReLU, 1x1 shortcut, maxpool."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        track_running_stats: bool = False,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()

        def bn() -> nn.BatchNorm2d:
            return nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats)

        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = bn()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = bn()
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = bn()
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), bn())
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = self.act(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        h = self.act(h + self.shortcut(x))
        return self.dropout(self.pool(h))


class ResNet12(nn.Module):
    """ResNet-12 with a linear head; parameters ``blocks.{0..3}.*`` and ``head.*``."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 5,
        channels: Sequence[int] = (64, 160, 320, 640),
        image_size: int = 84,
        pool: str = "avg",
        drop_rate: float = 0.0,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"ResNet12 needs 4 positive channel counts, got {channels!r}")
        if pool not in ("avg", "flatten"):
            raise ValueError(f"ResNet12 pool must be 'avg' or 'flatten', got {pool!r}")
        side = int(image_size)
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(
                f"ResNet12 needs image_size >= 16 (four 2x2 poolings), got {image_size}"
            )
        self.pool = pool
        chans = (int(in_channels),) + channels
        self.blocks = nn.Sequential(
            *(
                ResidualBlock(
                    chans[i],
                    chans[i + 1],
                    track_running_stats=track_running_stats,
                    drop_rate=drop_rate,
                )
                for i in range(4)
            )
        )
        self.feature_dim = channels[-1] if pool == "avg" else channels[-1] * side * side
        self.head = nn.Linear(self.feature_dim, int(num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flat per-example features ``[batch, feature_dim]`` (everything before ``head``)."""
        if x.dim() != 4:
            raise ValueError(f"ResNet12 expects images [batch, C, H, W], got {tuple(x.shape)}")
        h = self.blocks(x)
        return h.mean(dim=(2, 3)) if self.pool == "avg" else h.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
