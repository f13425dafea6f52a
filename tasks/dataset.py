"""Class-indexed datasets: the storage layer under every episode sampler.

A :class:`ClassDataset` answers two questions fast: how many images class ``c`` has, and the
images at some indices of class ``c``. Samplers index by class once, so drawing an episode costs
the same whatever the size of the dataset (unlike filtering a flat dataset per episode).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

import numpy as np
import torch

from tasks.errors import EpisodeSpecError

ImageTransform = Callable[[torch.Tensor], torch.Tensor]


class ClassDataset(abc.ABC):
    """Abstract dataset of images grouped by class.

    Subclasses implement :attr:`num_classes`, :meth:`num_images` and :meth:`images`.
    Images come back as float tensors ``[k, C, H, W]``.
    """

    @property
    @abc.abstractmethod
    def num_classes(self) -> int:
        """Number of classes."""

    @abc.abstractmethod
    def num_images(self, c: int) -> int:
        """Number of images of class ``c``."""

    @abc.abstractmethod
    def images(self, c: int, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Images ``indices`` of class ``c`` as a float tensor ``[len(indices), C, H, W]``."""

    def class_name(self, c: int) -> str:
        """A human-readable name of class ``c`` (defaults to its index)."""
        return str(c)

    def class_alphabets(self) -> list[str] | None:
        """The alphabet (superclass) of every class, or None when the dataset has no such grouping.

        Omniglot (Lake et al., Science 2015) groups its characters by alphabet; samplers use this
        for within-alphabet episodes (:class:`~tasks.sampler.TaskSampler`'s ``within_alphabet``).
        Wrappers (subsets, concatenations, rotation classes) pass it through.
        """
        return None

    def class_sizes(self) -> np.ndarray:
        """Number of images of every class, as an int64 array (computed once, then cached)."""
        cached = getattr(self, "_class_sizes_cache", None)
        if cached is None:
            cached = np.asarray(
                [self.num_images(c) for c in range(self.num_classes)], dtype=np.int64
            )
            self._class_sizes_cache = cached
        return cached

    def image(self, c: int, i: int) -> torch.Tensor:
        """One image ``[C, H, W]``."""
        return self.images(c, [i])[0]

    def class_images(self, c: int) -> torch.Tensor:
        """All images of class ``c``."""
        return self.images(c, np.arange(self.num_images(c)))

    def __len__(self) -> int:
        return self.num_classes

    def _check_class(self, c: int) -> None:
        if not 0 <= c < self.num_classes:
            raise IndexError(f"class {c} out of range: this dataset has {self.num_classes} classes")


def _to_float_images(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


class TensorClassDataset(ClassDataset):
    """A ClassDataset over one tensor of images and the row indices of each class.

    ``data`` is ``[N, C, H, W]`` (``uint8`` is scaled to ``[0, 1]`` on access, so large image sets
    stay compact in memory). ``class_indices[c]`` lists the rows of class ``c``. ``transform`` is
    applied to every batch of images returned by :meth:`images`.
    """

    def __init__(
        self,
        data: torch.Tensor,
        class_indices: Sequence[Sequence[int] | np.ndarray],
        names: Sequence[str] | None = None,
        transform: ImageTransform | None = None,
    ) -> None:
        if data.dim() != 4:
            raise ValueError(f"data must be [N, C, H, W], got shape {tuple(data.shape)}")
        self.data = data
        self.class_indices = [
            torch.as_tensor(np.asarray(ix, dtype=np.int64)) for ix in class_indices
        ]
        if names is not None and len(names) != len(self.class_indices):
            raise ValueError(f"{len(names)} names for {len(self.class_indices)} classes")
        self.names = list(names) if names is not None else None
        self.transform = transform

    @classmethod
    def from_labels(
        cls,
        data: torch.Tensor,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        names: Sequence[str] | None = None,
        transform: ImageTransform | None = None,
    ) -> TensorClassDataset:
        """Build from per-row integer labels; classes are the sorted distinct labels."""
        labels = np.asarray(labels)
        if len(labels) != len(data):
            raise ValueError(f"{len(labels)} labels for {len(data)} images")
        uniq, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(uniq))
        groups = np.split(order, np.cumsum(counts)[:-1])
        if names is None:
            names = [str(u) for u in uniq]
        return cls(data, groups, names, transform)

    @property
    def num_classes(self) -> int:
        return len(self.class_indices)

    def num_images(self, c: int) -> int:
        return int(self.class_indices[c].numel())

    def images(self, c: int, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        self._check_class(c)
        rows = self.class_indices[c][torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        x = _to_float_images(self.data[rows])
        return self.transform(x) if self.transform is not None else x

    def class_name(self, c: int) -> str:
        return self.names[c] if self.names is not None else str(c)


class SubsetClasses(ClassDataset):
    """A view of some classes of another ClassDataset (for train/validation/test class splits)."""

    def __init__(self, dataset: ClassDataset, classes: Sequence[int] | np.ndarray) -> None:
        self.dataset = dataset
        self.classes = np.asarray(classes, dtype=np.int64)
        bad = self.classes[(self.classes < 0) | (self.classes >= dataset.num_classes)]
        if bad.size:
            raise IndexError(
                f"classes {bad[:5].tolist()} out of range for a dataset of {dataset.num_classes}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def num_images(self, c: int) -> int:
        return self.dataset.num_images(int(self.classes[c]))

    def images(self, c: int, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        self._check_class(c)
        return self.dataset.images(int(self.classes[c]), indices)

    def class_name(self, c: int) -> str:
        return self.dataset.class_name(int(self.classes[c]))

    def class_alphabets(self) -> list[str] | None:
        parent = self.dataset.class_alphabets()
        return None if parent is None else [parent[int(c)] for c in self.classes]


class ConcatClasses(ClassDataset):
    """The classes of several ClassDatasets side by side (class ids offset in order)."""

    def __init__(self, datasets: Sequence[ClassDataset]) -> None:
        if not datasets:
            raise ValueError("ConcatClasses needs at least one dataset")
        self.datasets = list(datasets)
        self.offsets = np.cumsum([0] + [d.num_classes for d in self.datasets])

    def _locate(self, c: int) -> tuple[ClassDataset, int]:
        self._check_class(c)
        k = int(np.searchsorted(self.offsets, c, side="right") - 1)
        return self.datasets[k], int(c - self.offsets[k])

    @property
    def num_classes(self) -> int:
        return int(self.offsets[-1])

    def num_images(self, c: int) -> int:
        d, j = self._locate(c)
        return d.num_images(j)

    def images(self, c: int, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        d, j = self._locate(c)
        return d.images(j, indices)

    def class_name(self, c: int) -> str:
        d, j = self._locate(c)
        return d.class_name(j)

    def class_alphabets(self) -> list[str] | None:
        # All or nothing: a part without alphabets would leave classes that no alphabet holds.
        parts = [d.class_alphabets() for d in self.datasets]
        if any(p is None for p in parts):
            return None
        return [a for p in parts for a in p]  # type: ignore[union-attr]


class RotatedClasses(ClassDataset):
    """Each class rotated by each angle becomes its own class (Omniglot convention).

    Why: docs/methods/protocol.md.

    Class ``c * len(angles) + r`` is class ``c`` rotated by ``angles[r]`` degrees (multiples of 90).
    """

    def __init__(self, dataset: ClassDataset, angles: Sequence[int] = (0, 90, 180, 270)) -> None:
        for a in angles:
            if a % 90:
                raise ValueError(f"rotation angles must be multiples of 90 degrees, got {a}")
        self.dataset = dataset
        self.angles = tuple(int(a) for a in angles)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes * len(self.angles)

    def num_images(self, c: int) -> int:
        return self.dataset.num_images(c // len(self.angles))

    def images(self, c: int, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        self._check_class(c)
        base, r = divmod(c, len(self.angles))
        x = self.dataset.images(base, indices)
        k = (self.angles[r] // 90) % 4
        # rot90 with k>0 counter-clockwise over the spatial dims; contiguous for downstream convs.
        return torch.rot90(x, k, dims=(-2, -1)).contiguous() if k else x

    def class_name(self, c: int) -> str:
        base, r = divmod(c, len(self.angles))
        return f"{self.dataset.class_name(base)}@rot{self.angles[r]}"

    def class_alphabets(self) -> list[str] | None:
        # A rotated copy of a character is still a character of the same alphabet.
        base = self.dataset.class_alphabets()
        return None if base is None else [a for a in base for _ in self.angles]


def check_episode_spec(dataset: ClassDataset, ways: int, shots: int, queries: int) -> np.ndarray:
    """Validate an N-way K-shot Q-query spec against ``dataset``; return the eligible classes.

    A class is eligible when it has at least ``shots + queries`` images.
    """
    if ways < 1 or shots < 1 or queries < 0:
        raise EpisodeSpecError(
            f"need ways >= 1, shots >= 1 and queries >= 0; got ways={ways}, shots={shots}, "
            f"queries={queries}"
        )
    if ways > dataset.num_classes:
        raise EpisodeSpecError(
            f"{ways}-way episodes need {ways} classes but the dataset has only "
            f"{dataset.num_classes}; lower ways or use a larger split"
        )
    sizes = dataset.class_sizes()
    need = shots + queries
    eligible = np.flatnonzero(sizes >= need)
    if len(eligible) < ways:
        raise EpisodeSpecError(
            f"shots + queries = {need} images per class, but only {len(eligible)} of "
            f"{dataset.num_classes} classes have that many (largest class: {int(sizes.max())} "
            f"images); lower shots or queries"
        )
    return eligible
