"""``get_tasksets``: train/validation/test episode samplers for every supported dataset.

Each dataset module registers a *splits function* ``f(root, **options) -> {"train": ClassDataset,
"validation": ClassDataset, "test": ClassDataset}``; :func:`get_tasksets` wraps the splits in
:class:`~tasks.sampler.TaskSampler` objects with literature defaults.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.dataset import ClassDataset
from tasks.sampler import TaskSampler

SplitsFn = Callable[..., dict[str, ClassDataset]]

# name -> "module:function"; imported lazily so that one dataset's optional pieces never break
# another's import.
_REGISTRY: dict[str, str] = {}


def register_tasksets(name: str, target: str | SplitsFn) -> None:
    """Register a splits function (or a ``"module:function"`` path) under ``name``."""
    _REGISTRY[name] = target  # type: ignore[assignment]


def available_tasksets() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(name: str) -> SplitsFn:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown task distribution {name!r}; available: {', '.join(available_tasksets())}"
        )
    target = _REGISTRY[name]
    if callable(target):
        return target
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


@dataclass
class TaskSets:
    """The three episode samplers of a benchmark."""

    train: TaskSampler
    validation: TaskSampler
    test: TaskSampler

    def __iter__(self):
        return iter((self.train, self.validation, self.test))


def get_tasksets(
    name: str,
    root: str | None = None,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    seed: int = 0,
    test_queries: int | None = None,
    **options: Any,
) -> TaskSets:
    """Train/validation/test samplers of ``ways``-way ``shots``-shot episodes for ``name``.

    ``seed`` seeds episode sampling; the three samplers get distinct seeds derived from it so
    their streams never coincide. ``options`` go to the dataset's splits function (for example
    ``image_size`` or ``rotations`` for Omniglot, ``download``); ``split_seed`` is passed on as
    the splits function's own ``seed`` (its class split or, for generated data, its classes), which
    is otherwise left at its default so the standard splits stay fixed whatever ``seed`` is.
    """
    fn = _resolve(name)
    if "split_seed" in options and "split_seed" not in inspect.signature(fn).parameters:
        options["seed"] = options.pop("split_seed")
    splits = fn(root, **options)
    tq = queries if test_queries is None else test_queries
    return TaskSets(
        train=TaskSampler(splits["train"], ways, shots, queries, seed=seed),
        validation=TaskSampler(splits["validation"], ways, shots, tq, seed=seed + 1_000_003),
        test=TaskSampler(splits["test"], ways, shots, tq, seed=seed + 2_000_003),
    )


register_tasksets("glyphs", "tasks.glyphs:glyph_splits")
register_tasksets("omniglot", "tasks.omniglot:omniglot_splits")
register_tasksets("omniglot-minimal", "tasks.omniglot:omniglot_minimal_splits")
register_tasksets("mini-imagenet", "tasks.miniimagenet:mini_imagenet_splits")
register_tasksets("tiered-imagenet", "tasks.tieredimagenet:tiered_imagenet_splits")
register_tasksets("cifar-fs", "tasks.cifarfs:cifar_fs_splits")
register_tasksets("fc100", "tasks.fc100:fc100_splits")
register_tasksets("folder", "tasks.folder:folder_splits")
