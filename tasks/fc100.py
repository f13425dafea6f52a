"""FC100 (Oreshkin et al., 2018) in the MetaOptNet pickle format (Lee et al., 2019).

Files (docs/data-formats.md), in ``root``, ``root/FC100`` or ``root/fc100``::

    FC100_train.pickle, FC100_val.pickle, FC100_test.pickle

each a Python 2 pickle of a dict with ``data`` (``uint8`` ``N x 32 x 32 x 3``) and ``labels``
(CIFAR-100 fine label per image), which must be unpickled with ``encoding="latin1"``. The
literature split has 60/20/20 classes from 12/4/4 CIFAR-100 superclasses, 600 images each; the
loader reads whatever the files hold. There is no public URL with a published md5, so nothing is
downloaded: learn2learn's ``learn2learn.vision.datasets.FC100(root, download=True)`` fetches it.

:func:`read_data_labels_pickle` also reads MetaOptNet's ``CIFAR_FS_*.pickle`` (same format).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tasks.dataset import ClassDataset, ImageTransform, TensorClassDataset
from tasks.errors import CorruptDatasetError, DatasetNotFoundError
from tasks.miniimagenet import (
    SPLITS,
    canonical_split,
    find_file,
    get_key,
    hwc_to_chw_uint8,
    not_found,
    read_pickle,
)

_SHORT = {"train": "train", "validation": "val", "test": "test"}


def read_data_labels_pickle(
    path: str | os.PathLike[str], transform: ImageTransform | None = None
) -> TensorClassDataset:
    """A :class:`TensorClassDataset` from a MetaOptNet ``{"data", "labels"}`` pickle.

    Images are stored ``uint8`` ``[N, 3, H, W]``; classes are the distinct labels in sorted order,
    named by their label value.
    """
    path = Path(path)
    raw = read_pickle(path)
    data = hwc_to_chw_uint8(get_key(raw, "data", path), path)
    labels = np.asarray(get_key(raw, "labels", path)).reshape(-1)
    if len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptDatasetError(
            f"{path} has {len(data)} images but {len(labels)} labels of type {labels.dtype}; the "
            "file is corrupt or not in the expected format"
        )
    return TensorClassDataset.from_labels(data, labels, transform=transform)


def fc100_file(root: str | os.PathLike[str] | None, split: str) -> Path:
    """``FC100_{train,val,test}.pickle`` of ``split``; :class:`DatasetNotFoundError` if missing."""
    split = canonical_split(split)
    names = [f"FC100_{_SHORT[split]}.pickle"]
    if root is None:
        raise DatasetNotFoundError(f"FC100 needs root=<folder containing {names[0]}>")
    base = Path(root).expanduser()
    folders = [base, base / "FC100", base / "fc100"]
    path = find_file(folders, names)
    if path is None:
        raise not_found(
            f"FC100 {split} split",
            folders,
            names,
            "No public URL with a published md5 exists, so it is not downloaded: get the "
            "MetaOptNet/learn2learn FC100 pickles (learn2learn.vision.datasets.FC100(root, "
            "download=True) fetches them) and pass root=<their folder>",
        )
    return path


def fc100(
    root: str | os.PathLike[str], split: str = "train", transform: ImageTransform | None = None
) -> TensorClassDataset:
    """One FC100 split as a :class:`TensorClassDataset` (float images ``[k, 3, 32, 32]``)."""
    return read_data_labels_pickle(fc100_file(root, split), transform)


def fc100_splits(
    root: str | os.PathLike[str] | None,
    transform: ImageTransform | None = None,
    download: bool = False,
) -> dict[str, ClassDataset]:
    """``{"train", "validation", "test"}`` FC100 splits (60/20/20 classes).

    ``download`` is accepted for interface uniformity; there is no verified public URL, so
    missing files raise :class:`DatasetNotFoundError` naming the expected paths.
    """
    del download
    paths = {split: fc100_file(root, split) for split in SPLITS}
    return {split: read_data_labels_pickle(p, transform) for split, p in paths.items()}
