"""Episode samplers: N-way K-shot tasks drawn from a ClassDataset."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from tasks.dataset import ClassDataset, ImageTransform, check_episode_spec
from tasks.episode import Episode
from tasks.errors import EpisodeSpecError


@runtime_checkable
class EpisodeSource(Protocol):
    """Anything that yields Episodes: ``sample()`` the next one, ``sample(index)`` a given one."""

    def sample(self, index: int | None = None) -> Episode: ...


class IndexedEpisodes:
    """Stream bookkeeping shared by episode sources whose episode ``i`` is a pure function of
    ``(seed, i)``: the counter, ``sample()`` / ``sample(index)``, meta-batches, iteration and
    ``state_dict`` (seed + counter is the whole state). Subclasses implement :meth:`episode`."""

    seed: int
    index: int

    def rng(self, index: int) -> np.random.Generator:
        """numpy PCG64 stream of episode ``index`` (the same on every platform)."""
        return np.random.default_rng([self.seed, int(index)])

    def episode(self, index: int) -> Episode:
        """Episode ``index`` (pure function of ``(seed, index)``)."""
        raise NotImplementedError

    def sample(self, index: int | None = None) -> Episode:
        """Episode ``index``; with no index, the next one in this source's stream."""
        if index is None:
            index = self.index
            self.index += 1
        if index < 0:
            raise ValueError(f"episode index must be >= 0; got {index}")
        return self.episode(int(index))

    def sample_batch(self, batch_size: int) -> Episode:
        """The next ``batch_size`` episodes stacked into a meta-batch (leading task dimension)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        return Episode.stack([self.sample() for _ in range(batch_size)])

    def sample_batch_shard(self, batch_size: int, rank: int, world_size: int) -> Episode:
        """Worker ``rank``'s contiguous ``1/world_size`` share of the meta-batch that
        ``sample_batch(batch_size)`` would draw next (episodes ``index + rank*b ...`` with
        ``b = batch_size // world_size``). Advances the stream by the whole ``batch_size``, so
        every worker's counter stays equal and the workers together see exactly the tasks of a
        single-worker run."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank {rank} of {world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} must be a positive multiple of world_size {world_size}"
            )
        b = batch_size // world_size
        start = self.index + rank * b
        self.index += batch_size
        return Episode.stack([self.sample(start + j) for j in range(b)])

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.index = int(state["index"])


class TaskSampler(IndexedEpisodes):
    """Draws N-way K-shot episodes with ``queries`` query images per class.

    Episode ``i`` of a sampler is a pure function of ``(seed, i)`` (numpy's PCG64, which gives the
    same stream on every platform), so the same seed gives the same episodes on any machine,
    resuming needs only the episode counter (:meth:`state_dict`), and disjoint index sets
    (for example ``rank, rank + world, ...``) give disjoint task streams for parallel workers.

    Within an episode, labels ``0..N-1`` are assigned in a random class order; support and query
    are grouped by label (``K`` support images of label 0, then label 1, ...).

    ``within_alphabet=True`` draws the N classes of every episode from ONE alphabet (Lake et al.,
    Science 2015, whose 20 one-shot runs each use one alphabet; docs/methods/protocol.md): the
    alphabet uniformly among those with at least N eligible classes (smaller ones are skipped),
    then N of its classes uniformly. It needs a dataset that knows its alphabets
    (:meth:`~tasks.dataset.ClassDataset.class_alphabets`, e.g. Omniglot); Omniglot's rotation
    classes keep their character's alphabet.
    """

    def __init__(
        self,
        dataset: ClassDataset,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        transform: ImageTransform | None = None,
        within_alphabet: bool = False,
    ) -> None:
        self.dataset = dataset
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.seed = int(seed)
        self.transform = transform
        # Indexed once: per-episode cost is independent of the number of classes and images.
        self._eligible = check_episode_spec(dataset, self.ways, self.shots, self.queries)
        self.within_alphabet = bool(within_alphabet)
        self._alphabets: list[tuple[str, np.ndarray]] = (
            alphabet_pools(dataset, self._eligible, self.ways) if self.within_alphabet else []
        )
        self._sizes = dataset.class_sizes()
        self.index = 0

    def episode(self, index: int) -> Episode:
        rng = self.rng(index)
        pool = self._eligible
        if self.within_alphabet:
            # Same stream discipline as the plain draw: everything comes from rng(seed, index).
            pool = self._alphabets[int(rng.integers(len(self._alphabets)))][1]
        classes = rng.choice(pool, size=self.ways, replace=False)
        per_class = self.shots + self.queries
        sx, qx = [], []
        for c in classes:
            idx = rng.choice(int(self._sizes[c]), size=per_class, replace=False)
            x = self.dataset.images(int(c), idx)
            if self.transform is not None:
                x = self.transform(x)
            sx.append(x[: self.shots])
            qx.append(x[self.shots :])
        labels = torch.arange(self.ways, dtype=torch.int64)
        return Episode(
            support_x=torch.cat(sx),
            support_y=labels.repeat_interleave(self.shots),
            query_x=torch.cat(qx),
            query_y=labels.repeat_interleave(self.queries),
            classes=torch.as_tensor(classes, dtype=torch.int64),
        )

    @property
    def alphabets(self) -> list[str]:
        """Names of the alphabets episodes are drawn from (``within_alphabet`` only; else [])."""
        return [name for name, _ in self._alphabets]

    def __repr__(self) -> str:
        within = ", within one alphabet" if self.within_alphabet else ""
        return (
            f"{type(self).__name__}({self.ways}-way {self.shots}-shot, {self.queries} queries, "
            f"{self.dataset.num_classes} classes{within}, seed={self.seed})"
        )


def alphabet_pools(
    dataset: ClassDataset, eligible: np.ndarray, ways: int
) -> list[tuple[str, np.ndarray]]:
    """``(alphabet, eligible classes)`` of every alphabet with at least ``ways`` eligible classes.

    For within-alphabet episodes (Lake et al. 2015). Alphabets are sorted by name so the pools,
    and hence the episodes of a seed, do not depend on class order in memory.

    Args:
        dataset: a dataset whose :meth:`~tasks.dataset.ClassDataset.class_alphabets` is not None.
        eligible: the classes with enough images (:func:`~tasks.dataset.check_episode_spec`).
        ways: N, the classes one episode needs.

    Returns:
        A non-empty list of ``(name, int64 class ids)``.

    Raises:
        EpisodeSpecError: the dataset has no alphabets, or no alphabet has ``ways`` classes.
    """
    names = dataset.class_alphabets()
    if names is None:
        raise EpisodeSpecError(
            f"within_alphabet needs a dataset that knows the alphabet of each class (e.g. "
            f"Omniglot); {type(dataset).__name__} does not; set within_alphabet=False"
        )
    by_alpha: dict[str, list[int]] = {}
    for c in eligible:
        by_alpha.setdefault(names[int(c)], []).append(int(c))
    pools = [
        (a, np.asarray(cs, dtype=np.int64)) for a, cs in sorted(by_alpha.items()) if len(cs) >= ways
    ]
    if not pools:
        largest, members = max(by_alpha.items(), key=lambda kv: len(kv[1]))
        raise EpisodeSpecError(
            f"within-alphabet {ways}-way episodes need an alphabet with {ways} classes, but the "
            f"largest, {largest}, has {len(members)} (with enough images); lower ways to "
            f"{len(members)} or less, use a split with larger alphabets, or set "
            "within_alphabet=False"
        )
    return pools
