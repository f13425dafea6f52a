"""Adapters between this package's episodes and the torchmeta and learn2learn conventions.

* :class:`TorchmetaBatches` yields meta-batches laid out like torchmeta's ``BatchMetaDataLoader``
  (Deleu et al., 2019): ``batch["train"] = (inputs [B, N*K, C, H, W], targets [B, N*K])`` and
  ``batch["test"] = (inputs [B, N*Q, C, H, W], targets [B, N*Q])``.
* :class:`L2LTaskView` answers ``sample() -> (X, y)`` like learn2learn's ``TaskDataset``
  (Arnold et al., 2020), with the support set first.
* :class:`EpisodesFromCallable` goes the other way: any ``() -> (X, y)`` task callable (for
  example ``learn2learn.data.TaskDataset.sample``) becomes an episode source.
* :class:`EpisodesFromTaskset` turns a learn2learn ``Taskset`` / ``TaskDataset`` itself into a
  seeded episode source whose episode ``i`` is a pure function of ``(seed, i)``, like
  :class:`~tasks.sampler.TaskSampler`.

No torchmeta or learn2learn import is needed; the layouts are plain tensors and learn2learn
objects are used through their public methods only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from tasks.episode import Episode
from tasks.errors import EpisodeSpecError
from tasks.sampler import EpisodeSource, IndexedEpisodes

XY = tuple[torch.Tensor, torch.Tensor]


class TorchmetaBatches:
    """Meta-batches of ``batch_size`` episodes in torchmeta's ``BatchMetaDataLoader`` layout.

    Each item is a dict with ``"train"`` (support) and ``"test"`` (query), each an
    ``(inputs, targets)`` pair with a leading task dimension, so torchmeta training loops run
    unchanged::

        for batch in TorchmetaBatches(sampler, batch_size=4, num_batches=100):
            train_inputs, train_targets = batch["train"]   # [4, N*K, C, H, W], [4, N*K]
            test_inputs, test_targets = batch["test"]      # [4, N*Q, C, H, W], [4, N*Q]

    Episodes are the next ones of ``sampler``'s stream (``sampler.sample()``), so batch ``b``
    holds episodes ``b*B .. b*B+B-1`` of a fresh sampler, grouped by label as the sampler gives
    them. With ``num_batches=None`` iteration never stops; otherwise each pass yields
    ``num_batches`` batches and ``len()`` is defined.
    """

    def __init__(
        self, sampler: EpisodeSource, batch_size: int, num_batches: int | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be >= 0 or None, got {num_batches}")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.num_batches = num_batches

    @staticmethod
    def to_batch(meta: Episode) -> dict[str, XY]:
        """A stacked meta-batch (:meth:`Episode.stack`) in torchmeta's dict layout."""
        return {"train": (meta.support_x, meta.support_y), "test": (meta.query_x, meta.query_y)}

    def __iter__(self) -> Iterator[dict[str, XY]]:
        b = 0
        while self.num_batches is None or b < self.num_batches:
            episodes = [self.sampler.sample() for _ in range(self.batch_size)]
            yield self.to_batch(Episode.stack(episodes))
            b += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("TorchmetaBatches with num_batches=None is infinite and has no len()")
        return self.num_batches


class L2LTaskView:
    """learn2learn-style tasks: :meth:`sample` returns ``(X, y)`` for the next episode.

    ``X`` is ``[N*(K+Q), C, H, W]``: the ``N*K`` support images first (``K`` of label 0, then
    ``K`` of label 1, ...), then the ``N*Q`` query images in the same label order; ``y`` holds
    their labels in ``0..N-1``. Because the first ``K`` occurrences of every label are its support
    images, ``learn2learn.data.partition_task(X, y, shots=K)`` recovers exactly the support and
    query sets, as does :meth:`split`. Iterating gives an endless stream of tasks (no ``len``).
    """

    def __init__(self, sampler: EpisodeSource) -> None:
        self.sampler = sampler

    @staticmethod
    def to_task(episode: Episode) -> XY:
        """An (unbatched) episode as ``(X, y)``: support then query."""
        if episode.is_batched:
            raise ValueError("L2LTaskView takes single episodes, not a stacked meta-batch")
        x = torch.cat([episode.support_x, episode.query_x])
        y = torch.cat([episode.support_y, episode.query_y])
        return x, y

    def sample(self, index: int | None = None) -> XY:
        """The next task (or task ``index`` of the sampler's stream) as ``(X, y)``."""
        return self.to_task(self.sampler.sample(index))

    def __getitem__(self, index: int) -> XY:
        """Task ``index`` of the sampler's stream, like ``TaskDataset[i]`` in learn2learn."""
        return self.sample(int(index))

    def __iter__(self) -> Iterator[XY]:
        while True:
            yield self.sample()

    @property
    def num_support(self) -> int:
        """``N * K``: the support images at the front of every ``X``."""
        ways = getattr(self.sampler, "ways", None)
        shots = getattr(self.sampler, "shots", None)
        if ways is None or shots is None:
            raise AttributeError(
                "the wrapped sampler has no ways/shots attributes; use split(X, y, num_support)"
            )
        return int(ways) * int(shots)

    def split(
        self, x: torch.Tensor, y: torch.Tensor, num_support: int | None = None
    ) -> tuple[XY, XY]:
        """``((support_x, support_y), (query_x, query_y))`` of a task from :meth:`sample`."""
        n = self.num_support if num_support is None else int(num_support)
        if len(x) != len(y) or not 0 < n <= len(x):
            raise ValueError(
                f"cannot split a task of {len(x)} inputs and {len(y)} labels after {n} support "
                "examples; pass the (X, y) returned by sample()"
            )
        return (x[:n], y[:n]), (x[n:], y[n:])


class EpisodesFromCallable:
    """An episode source over any task callable ``fn() -> (X, y)``.

    This wraps, for example, ``learn2learn.data.TaskDataset.sample`` or any home-made task
    generator. Each task must contain exactly ``ways`` distinct labels with ``shots + queries``
    examples each. Labels are renamed ``0..N-1`` in order of first appearance in ``y``; for
    each class the first ``shots`` examples (in ``X`` order) form the support set and the rest the
    query set; both sets are grouped by label like :class:`~tasks.sampler.TaskSampler` output,
    and ``Episode.classes[k]`` is the original label renamed ``k``.

    ``sample(index)`` needs ``index_fn`` (for example ``taskset.__getitem__`` of a learn2learn
    ``TaskDataset`` with a fixed ``num_tasks``); without it only ``sample()`` works, since a plain
    callable cannot reproduce a given task.
    """

    def __init__(
        self,
        fn: Callable[[], Any],
        ways: int,
        shots: int,
        queries: int,
        index_fn: Callable[[int], Any] | None = None,
    ) -> None:
        if ways < 1 or shots < 1 or queries < 0:
            raise EpisodeSpecError(
                f"need ways >= 1, shots >= 1 and queries >= 0; got ways={ways}, shots={shots}, "
                f"queries={queries}"
            )
        self.fn = fn
        self.index_fn = index_fn
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)

    def sample(self, index: int | None = None) -> Episode:
        """The next task of ``fn`` (or task ``index`` through ``index_fn``) as an Episode."""
        if index is None:
            task = self.fn()
        elif self.index_fn is None:
            raise ValueError(
                "sample(index) needs index_fn (e.g. index_fn=taskset.__getitem__); a plain task "
                "callable cannot reproduce a given task. Call sample() without an index"
            )
        else:
            task = self.index_fn(int(index))
        return self.to_episode(task)

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def to_episode(self, task: Any) -> Episode:
        """Split one ``(X, y)`` task into a relabelled Episode (see the class docstring)."""
        if not isinstance(task, tuple | list) or len(task) < 2:
            raise EpisodeSpecError(
                f"the task callable returned {type(task).__name__}; it must return (X, y)"
            )
        x, y = torch.as_tensor(task[0]), torch.as_tensor(task[1])
        if y.dim() != 1 or len(y) != len(x):
            raise EpisodeSpecError(
                f"a task must be (X, y) with y one label per row of X; got X {tuple(x.shape)} "
                f"and y {tuple(y.shape)}"
            )
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise EpisodeSpecError("task labels must be integers (classification tasks)")
        labels = y.detach().cpu().to(torch.int64).numpy()
        uniq, first = np.unique(labels, return_index=True)
        order = uniq[np.argsort(first)]  # labels in order of first appearance
        per_class = self.shots + self.queries
        if len(order) != self.ways:
            raise EpisodeSpecError(
                f"the task has {len(order)} distinct labels, expected ways={self.ways}; build "
                "the tasks with the same ways as EpisodesFromCallable"
            )
        rows_s, rows_q = [], []
        for lab in order:
            rows = np.flatnonzero(labels == lab)
            if len(rows) != per_class:
                raise EpisodeSpecError(
                    f"label {int(lab)} has {len(rows)} examples, expected shots + queries = "
                    f"{self.shots} + {self.queries} = {per_class}; build the tasks with "
                    "matching shots/queries (e.g. learn2learn KShots(dataset, shots + queries))"
                )
            rows_s.append(rows[: self.shots])
            rows_q.append(rows[self.shots :])
        s = torch.as_tensor(np.concatenate(rows_s), device=x.device)
        q = torch.as_tensor(np.concatenate(rows_q), device=x.device)
        new = torch.arange(self.ways, dtype=torch.int64, device=x.device)
        return Episode(
            support_x=x[s],
            support_y=new.repeat_interleave(self.shots),
            query_x=x[q],
            query_y=new.repeat_interleave(self.queries),
            classes=torch.as_tensor(order, dtype=torch.int64, device=x.device),
        )


@contextmanager
def _global_rngs_seeded(rng: np.random.Generator) -> Iterator[None]:
    """Seed Python's, numpy's and torch's (CPU) global generators from ``rng`` for the block, then
    restore their previous states.

    learn2learn's task transforms draw from the global ``random`` module (``random.sample`` in
    NWays/KShots, ``random.shuffle`` in RemapLabels) and dataset transforms may draw from numpy or
    torch, so a reproducible task needs all three seeded; restoring them keeps the caller's own
    random streams unaffected by sampling.
    """
    py_seed, np_seed, torch_seed = (int(s) for s in rng.integers(0, 2**32, size=3))
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(py_seed)
        np.random.seed(np_seed)
        torch.manual_seed(torch_seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _transform_sizes(taskset: Any) -> tuple[int | None, int | None]:
    """``(n, k)`` declared by a learn2learn taskset's NWays / KShots / FusedNWaysKShots transforms
    (``None`` where no such transform is found)."""
    transforms = getattr(taskset, "task_transforms", None)
    n = k = None
    if isinstance(transforms, list | tuple):
        for t in transforms:
            name = type(t).__name__
            if name in ("NWays", "FusedNWaysKShots"):
                n = int(t.n)
            if name in ("KShots", "FusedNWaysKShots"):
                k = int(t.k)
    return n, k


class EpisodesFromTaskset(IndexedEpisodes):
    """Seeded episodes from a learn2learn ``Taskset`` / ``TaskDataset`` (Arnold et al., 2020).

    Episode ``i`` is a pure function of ``(seed, i)`` as for :class:`~tasks.sampler.TaskSampler`:
    the taskset's task description is drawn (``taskset.sample_task_description()``) with Python's,
    numpy's and torch's global generators seeded from ``(seed, i)`` and restored afterwards, then
    loaded with ``taskset.get_task``. The taskset's own cache of descriptions (``num_tasks > 0``)
    is bypassed, so ``num_tasks`` does not matter here; a fixed pool of tasks is
    ``sample(i) for i in range(pool)``.

    The ``(X, y)`` task is split as in :class:`EpisodesFromCallable`: labels renamed ``0..N-1`` in
    order of first appearance, per class the first ``shots`` rows support and the rest query. Build
    the taskset with ``NWays(n=ways)`` and ``KShots(k=shots + queries)`` (checked when the
    transforms are found). ``Episode.classes[k]`` is the original dataset label of class ``k``
    (read from ``taskset.dataset.indices_to_labels``), not learn2learn's remapped label.

    Not thread-safe: the global generators are reseeded while a task is drawn.
    """

    def __init__(self, taskset: Any, ways: int, shots: int, queries: int, seed: int = 0) -> None:
        missing = [a for a in ("sample_task_description", "get_task") if not hasattr(taskset, a)]
        if missing:
            raise TypeError(
                f"{type(taskset).__name__} has no {' / '.join(missing)}; EpisodesFromTaskset "
                "needs a learn2learn Taskset/TaskDataset (for any other task callable use "
                "EpisodesFromCallable)"
            )
        self._split = EpisodesFromCallable(taskset.sample, ways, shots, queries)
        n, k = _transform_sizes(taskset)
        if n is not None and n != ways:
            raise EpisodeSpecError(
                f"the taskset's NWays draws n={n} classes but ways={ways}; use the same number"
            )
        if k is not None and k != shots + queries:
            raise EpisodeSpecError(
                f"the taskset's KShots draws k={k} examples per class but shots + queries = "
                f"{shots} + {queries} = {shots + queries}; build it with KShots(dataset, "
                f"k={shots + queries})"
            )
        self.taskset = taskset
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.seed = int(seed)
        self.index = 0

    def episode(self, index: int) -> Episode:
        with _global_rngs_seeded(self.rng(index)):
            description = self.taskset.sample_task_description()
            task = self.taskset.get_task(description)
        ep = self._split.to_episode(task)
        classes = self._original_classes(description, task[1], ep.classes)
        if classes is not None:
            ep.classes = classes
        return ep

    def _original_classes(
        self, description: Any, y: Any, task_classes: torch.Tensor
    ) -> torch.Tensor | None:
        """Dataset label of each episode class, or ``None`` when the task does not say."""
        labels_of = getattr(getattr(self.taskset, "dataset", None), "indices_to_labels", None)
        if labels_of is None:
            return None  # a custom dataset: keep the task's own labels
        y = torch.as_tensor(y)
        try:
            rows = [labels_of[dd.index] for dd in description]
            original = torch.as_tensor([int(v) for v in rows], dtype=torch.int64)
        except (TypeError, KeyError, AttributeError, ValueError):
            return None  # a custom dataset or transform: keep the task's own labels
        if len(original) != len(y):
            return None
        out = []
        for t in task_classes.tolist():
            found = torch.unique(original[y.cpu() == t])
            if len(found) != 1:
                return None
            out.append(int(found))
        return torch.tensor(out, dtype=torch.int64, device=task_classes.device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.ways}-way {self.shots}-shot, {self.queries} queries, "
            f"taskset={type(self.taskset).__name__}, seed={self.seed})"
        )
