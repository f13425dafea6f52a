"""Episodes: one few-shot task (support and query sets) and meta-batches of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch


@dataclass
class Episode:
    """One few-shot task (docs/methods/protocol.md).

    ``support_x``/``query_x`` are inputs, ``support_y``/``query_y`` targets. For classification the
    targets are ``int64`` labels in ``0..N-1`` assigned in a random class order, and ``classes[k]``
    is the original class id that label ``k`` stands for. For regression the targets are float
    tensors and ``classes`` holds the task's parameters (for example amplitude and phase).

    A *meta-batch* is an Episode whose tensors carry a leading task dimension ``B``
    (see :meth:`stack`); ``classes`` then has shape ``[B, N]``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

    @property
    def ways(self) -> int:
        """Number of classes N (for regression: number of task parameters)."""
        return int(self.classes.shape[-1])

    @property
    def is_batched(self) -> bool:
        return self.classes.dim() == 2

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episode:
        """Return a copy with every tensor moved to ``device``."""
        return Episode(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )

    def pin_memory(self) -> Episode:
        return Episode(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    @staticmethod
    def stack(episodes: Sequence[Episode]) -> Episode:
        """Stack episodes of equal shape into a meta-batch with a leading task dimension."""
        if not episodes:
            raise ValueError("Episode.stack needs at least one episode")
        out = {}
        for f in fields(Episode):
            tensors = [getattr(e, f.name) for e in episodes]
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) != 1:
                raise ValueError(
                    f"cannot stack episodes: field {f.name!r} has shapes {sorted(shapes)}; "
                    "all episodes of a meta-batch need the same ways, shots and queries"
                )
            out[f.name] = torch.stack(tensors)
        return Episode(**out)

    def unstack(self) -> list[Episode]:
        """Inverse of :meth:`stack`."""
        if not self.is_batched:
            return [self]
        n = self.classes.shape[0]
        return [
            Episode(**{f.name: getattr(self, f.name)[i] for f in fields(self)}) for i in range(n)
        ]

    def __len__(self) -> int:
        return int(self.classes.shape[0]) if self.is_batched else 1
