"""A bounded cache of NPBML's per-episode no-grad work, for episodes evaluated again and again.

Validation runs every few hundred meta-steps on the same fixed episodes, and NPBML's frozen parts
(the leading blocks and the relation network) give the same features and scores for an episode
every time: about half of NPBML's test-time adaptation (issue 13, docs/benchmarks.md). The cache
keys an entry on the episode's *content* (a BLAKE2 digest of the tensors' bytes, dtype and shape)
and on the version counters of the frozen tensors, so a changed input or frozen weight (e.g.
``load_state_dict``, which copies in place) can never return a stale entry: it misses instead.
Only CPU tensors are hashed (a GPU tensor would need a copy to the host); elsewhere it computes.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar, cast

import torch

__all__ = ["EpisodeCache"]

T = TypeVar("T")


class EpisodeCache:
    """Least-recently-used map ``(tag, tensors' content, frozen versions) -> value``.

    Args:
        size: the most entries kept (0: no caching).
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"EpisodeCache size must be >= 0, got {size}")
        self.size = int(size)
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()  # task-parallel evaluation shares one cache

    def __getstate__(self) -> dict[str, object]:
        """Copies and pickles (``copy.deepcopy`` of a learner, ``torch.save``) start empty: a
        lock cannot be copied, and the entries are only a cache."""
        state = self.__dict__.copy()
        del state["_lock"]
        state["_entries"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @staticmethod
    def _key(
        tag: str, tensors: Iterable[torch.Tensor], frozen: Iterable[torch.Tensor]
    ) -> Hashable | None:
        digest = hashlib.blake2b(tag.encode(), digest_size=16)
        for t in tensors:
            if t.device.type != "cpu":
                return None
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.detach().contiguous().numpy().tobytes())
        versions = tuple((id(p), p._version) for p in frozen)
        return digest.hexdigest(), versions

    def get(
        self,
        tag: str,
        tensors: Iterable[torch.Tensor],
        frozen: Iterable[torch.Tensor],
        compute: Callable[[], T],
    ) -> T:
        """The cached value for this content and these frozen tensors, else ``compute()``
        (stored, evicting the least recently used entry beyond ``size``)."""
        if self.size == 0:
            return compute()
        key = self._key(tag, tensors, frozen)
        if key is None:
            return compute()
        with self._lock:
            if key in self._entries:
                self.hits += 1
                self._entries.move_to_end(key)
                return cast(T, self._entries[key])
            self.misses += 1
        value = compute()
        with self._lock:
            self._entries[key] = value
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value
