"""``get_tasksets``: train/validation/test episode samplers for every supported dataset.

Each dataset module registers a *splits function* ``f(root, **options) -> {"train": ClassDataset,
"validation": ClassDataset, "test": ClassDataset}``; :func:`get_tasksets` wraps the splits in
:class:`~tasks.sampler.TaskSampler` objects with literature defaults.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.dataset import ClassDataset
from tasks.errors import EpisodeSpecError
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
    within_alphabet: bool | str | Sequence[str] = False,
    **options: Any,
) -> TaskSets:
    """Train/validation/test samplers of ``ways``-way ``shots``-shot episodes for ``name``.

    ``seed`` seeds episode sampling; the three samplers get distinct seeds derived from it so
    their streams never coincide. ``options`` go to the dataset's splits function (for example
    ``image_size`` or ``rotations`` for Omniglot, ``download``); ``split_seed`` is passed on as
    the splits function's own ``seed`` (its class split or, for generated data, its classes), which
    is otherwise left at its default so the standard splits stay fixed whatever ``seed`` is.

    ``within_alphabet`` (Omniglot; Lake et al. 2015): draw the N classes of each episode from one
    alphabet (:class:`~tasks.sampler.TaskSampler`). ``True`` for every split, or a split name or
    list of names (``"test"``, ``["validation", "test"]``) for only those; in an experiment config
    it is ``data.options.within_alphabet``.
    """
    fn = _resolve(name)
    if "split_seed" in options and "split_seed" not in inspect.signature(fn).parameters:
        options["seed"] = options.pop("split_seed")
    within = within_alphabet_splits(within_alphabet)
    splits = fn(root, **options)
    tq = queries if test_queries is None else test_queries
    spec = {
        "train": (queries, seed),
        "validation": (tq, seed + 1_000_003),
        "test": (tq, seed + 2_000_003),
    }
    samplers = {}
    for split, (q, s) in spec.items():
        try:
            samplers[split] = TaskSampler(
                splits[split], ways, shots, q, seed=s, within_alphabet=split in within
            )
        except EpisodeSpecError as e:
            hint = ""
            if split in within and within != {"test"}:
                hint = ' (or restrict the option to the test split: within_alphabet="test")'
            raise EpisodeSpecError(f"{name} {split} split: {e}{hint}") from e
    return TaskSets(**samplers)


SPLIT_NAMES = ("train", "validation", "test")


def within_alphabet_splits(value: bool | str | Sequence[str]) -> frozenset[str]:
    """The splits a ``within_alphabet`` option applies to (see :func:`get_tasksets`).

    Args:
        value: ``True``/``False`` (all splits / none), one split name, or a list of names.

    Returns:
        The set of split names, a subset of ``("train", "validation", "test")``.

    Raises:
        ValueError: an unknown split name or a value of another type.
    """
    if isinstance(value, bool):
        return frozenset(SPLIT_NAMES) if value else frozenset()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"within_alphabet must be true/false, a split name or a list of split names, "
            f"got {value!r}"
        )
    bad = [n for n in names if n not in SPLIT_NAMES]
    if bad:
        raise ValueError(
            f"within_alphabet: unknown split {bad[0]!r}; use true, false or a list of "
            f"{', '.join(SPLIT_NAMES)}"
        )
    return frozenset(names)


register_tasksets("glyphs", "tasks.glyphs:glyph_splits")
register_tasksets("omniglot", "tasks.omniglot:omniglot_splits")
register_tasksets("omniglot-minimal", "tasks.omniglot:omniglot_minimal_splits")
register_tasksets("mini-imagenet", "tasks.miniimagenet:mini_imagenet_splits")
register_tasksets("tiered-imagenet", "tasks.tieredimagenet:tiered_imagenet_splits")
register_tasksets("cifar-fs", "tasks.cifarfs:cifar_fs_splits")
register_tasksets("fc100", "tasks.fc100:fc100_splits")
register_tasksets("folder", "tasks.folder:folder_splits")
