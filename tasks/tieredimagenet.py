"""tiered-ImageNet in the learn2learn pickle format (Ren et al., 2018).

Files (docs/data-formats.md), in ``root`` or ``root/tiered-imagenet``::

    {train,val,test}_images_png.pkl   a list (or object array) of PNG-encoded images
    {train,val,test}_labels.pkl       a dict whose key label_specific holds one int per image

The literature split has 351/97/160 classes (608 ImageNet classes grouped into 34 categories,
20/6/8 per split; Ren et al., 2018); the loader reads whatever the files hold. Decoded, the set
is about 20 GB, so images stay PNG-encoded in memory and are decoded with Pillow when an episode
needs them. There is no public URL with a published md5, so nothing is downloaded: learn2learn's
``learn2learn.vision.datasets.TieredImagenet(root, mode=..., download=True)`` fetches the files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.dataset import ClassDataset, ImageTransform
from tasks.errors import CorruptDatasetError, DatasetNotFoundError
from tasks.folder import decode_image
from tasks.miniimagenet import SPLITS, canonical_split, find_file, get_key, not_found, read_pickle

_SHORT = {"train": "train", "validation": "val", "test": "test"}


def tiered_imagenet_files(root: str | os.PathLike[str] | None, split: str) -> tuple[Path, Path]:
    """The (images, labels) pickles of ``split``; :class:`DatasetNotFoundError` when missing."""
    split = canonical_split(split)
    # learn2learn names the validation files "val_*"; "validation_*" is accepted as an alias.
    prefixes = [_SHORT[split]] + (["validation"] if split == "validation" else [])
    if root is None:
        raise DatasetNotFoundError(
            f"tiered-ImageNet needs root=<folder containing {prefixes[0]}_images_png.pkl and "
            f"{prefixes[0]}_labels.pkl>"
        )
    base = Path(root).expanduser()
    folders = [base, base / "tiered-imagenet"]
    how = (
        "No public URL with a published md5 exists, so it is not downloaded: get the "
        "learn2learn files (learn2learn.vision.datasets.TieredImagenet(root, mode=..., "
        "download=True) fetches them) and pass root=<their folder>"
    )
    out = []
    for suffix in ("_images_png.pkl", "_labels.pkl"):
        names = [p + suffix for p in prefixes]
        path = find_file(folders, names)
        if path is None:
            raise not_found(f"tiered-ImageNet {split} split", folders, names, how)
        out.append(path)
    return out[0], out[1]


def _as_bytes(item: Any) -> bytes | np.ndarray:
    # Python 2 pickles read with latin1 give str; the original files hold uint8 arrays of bytes.
    return item.encode("latin1") if isinstance(item, str) else item


class TieredImageNet(ClassDataset):
    """One split of tiered-ImageNet, PNG-decoded lazily per episode.

    ``split`` is ``"train"``, ``"validation"`` (or ``"val"``) or ``"test"``. Classes are the
    distinct ``label_specific`` values in sorted order, named by ``label_specific_str`` when the
    labels file has it. Images come back as float ``[k, 3, H, W]`` in ``[0, 1]`` (84 x 84 for the
    real data); ``transform`` is applied to every batch.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: ImageTransform | None = None,
    ) -> None:
        self.split = canonical_split(split)
        self.images_path, self.labels_path = tiered_imagenet_files(root, self.split)
        raw_labels = read_pickle(self.labels_path)
        labels = np.asarray(get_key(raw_labels, "label_specific", self.labels_path)).reshape(-1)
        if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise CorruptDatasetError(
                f"label_specific in {self.labels_path} is empty or not integer ({labels.dtype}); "
                "the file is corrupt"
            )
        images = read_pickle(self.images_path)
        if not isinstance(images, list | tuple | np.ndarray) or len(images) != len(labels):
            n = len(images) if hasattr(images, "__len__") else "no"
            raise CorruptDatasetError(
                f"{self.images_path} holds {n} images but {self.labels_path} has {len(labels)} "
                "labels; one of the files is truncated or from another split"
            )
        self.png = images
        uniq, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(uniq))
        self.class_rows = np.split(order, np.cumsum(counts)[:-1])
        self.labels = uniq
        names = None
        try:
            strs = get_key(raw_labels, "label_specific_str", self.labels_path)
            if len(strs) > int(uniq.max()) and uniq.min() >= 0:
                names = [_name(strs[int(u)]) for u in uniq]
        except (CorruptDatasetError, TypeError):
            names = None
        self.names = names if names is not None else [str(int(u)) for u in uniq]
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_rows)

    def num_images(self, c: int) -> int:
        return len(self.class_rows[c])

    def class_name(self, c: int) -> str:
        return self.names[c]

    def images(self, c: int, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        self._check_class(c)
        rows = self.class_rows[c][np.asarray(indices, dtype=np.int64)]
        x = torch.stack(
            [
                decode_image(
                    _as_bytes(self.png[int(r)]), 3, name=f"image {int(r)} of {self.images_path}"
                )
                for r in rows.reshape(-1)
            ]
        )
        x = x.float().div_(255.0)
        return self.transform(x) if self.transform is not None else x


def _name(s: Any) -> str:
    return s.decode() if isinstance(s, bytes) else str(s)


def tiered_imagenet_splits(
    root: str | os.PathLike[str] | None,
    transform: ImageTransform | None = None,
    download: bool = False,
) -> dict[str, ClassDataset]:
    """``{"train", "validation", "test"}`` :class:`TieredImageNet` splits (351/97/160 classes).

    ``download`` is accepted for interface uniformity; there is no verified public URL, so
    missing files raise :class:`DatasetNotFoundError` naming the expected paths.
    """
    del download
    for split in SPLITS:
        tiered_imagenet_files(root, split)
    assert root is not None  # tiered_imagenet_files raised DatasetNotFoundError otherwise
    return {split: TieredImageNet(root, split, transform) for split in SPLITS}
