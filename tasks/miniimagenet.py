"""mini-ImageNet in the learn2learn pickle format (Vinyals et al., 2016; Ravi & Larochelle, 2017).

Files (docs/data-formats.md), in ``root`` or ``root/mini-imagenet``::

    mini-imagenet-cache-train.pkl
    mini-imagenet-cache-validation.pkl   (or the original name mini-imagenet-cache-val.pkl)
    mini-imagenet-cache-test.pkl

Each is a pickled dict with ``image_data`` (``uint8`` array ``N x 84 x 84 x 3``) and
``class_dict`` (``{wnid: [row indices]}``). The literature split has 64/16/20 classes of 600
images each (Ravi & Larochelle, 2017); the loader reads whatever the files hold. There is no
public URL with a published md5, so nothing is downloaded: learn2learn's
``learn2learn.vision.datasets.MiniImagenet(root, mode=..., download=True)`` fetches these files.

This module also holds the pickle-reading helpers shared by the other pickle-based loaders.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.dataset import ClassDataset, ImageTransform, TensorClassDataset
from tasks.errors import CorruptDatasetError, DatasetNotFoundError

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


def canonical_split(split: str) -> str:
    """``"train"``, ``"validation"`` (also spelled ``"val"``) or ``"test"``."""
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"split must be 'train', 'validation' (or 'val') or 'test', got {split!r}")
    return _SPLIT_ALIASES[split]


def find_file(folders: Sequence[Path], names: Sequence[str]) -> Path | None:
    """The first ``folder / name`` that is a file (folders outer, names inner), else ``None``."""
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def not_found(what: str, folders: Sequence[Path], names: Sequence[str], how: str) -> Exception:
    """A :class:`DatasetNotFoundError` listing every path that was tried and how to get the data."""
    tried = ", ".join(str(f / n) for f in folders for n in names)
    return DatasetNotFoundError(f"{what} not found; looked for {tried}. {how}")


def read_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path``; files written by Python 2 are retried with ``encoding="latin1"``.

    ``latin1`` maps every byte to one code point, so Python 2 ``str`` objects (numpy buffers
    included) round-trip losslessly, which ASCII (the default) refuses. A truncated or garbled
    file raises :class:`CorruptDatasetError` naming it.
    """
    path = Path(path)

    def load(encoding: str = "ASCII") -> Any:
        with open(path, "rb") as f:
            return pickle.load(f, encoding=encoding)

    try:
        try:
            return load()
        except UnicodeDecodeError:
            return load(encoding="latin1")
    except (
        pickle.UnpicklingError,
        EOFError,
        UnicodeDecodeError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
    ) as e:
        raise CorruptDatasetError(
            f"cannot unpickle {path}: {type(e).__name__}: {e}. The file is truncated, corrupt or "
            "not in the expected format; delete it and download it again"
        ) from e


def get_key(d: Any, key: str, path: Path) -> Any:
    """``d[key]`` of a dict unpickled from ``path``; ``bytes`` keys (Python 2 pickles) count."""
    if not isinstance(d, dict):
        raise CorruptDatasetError(
            f"{path} holds a {type(d).__name__}, expected a dict with key {key!r}; the file is "
            "not in the expected format"
        )
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    keys = ", ".join(repr(k) for k in list(d)[:10])
    raise CorruptDatasetError(
        f"{path} has no key {key!r} (keys: {keys}); the file is not in the expected format"
    )


def hwc_to_chw_uint8(images: Any, path: Path) -> torch.Tensor:
    """``N x H x W x 3`` uint8 images (array or list of arrays) as a contiguous ``[N, 3, H, W]``."""
    try:
        arr = np.asarray(images) if not isinstance(images, list) else np.stack(images)
    except ValueError as e:
        raise CorruptDatasetError(f"images in {path} have unequal shapes: {e}") from e
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise CorruptDatasetError(
            f"images in {path} have shape {arr.shape}, expected N x H x W x 3; the file is not in "
            "the expected format"
        )
    if arr.dtype != np.uint8:
        raise CorruptDatasetError(f"images in {path} are {arr.dtype}, expected uint8")
    # One uint8 channels-first copy; the float conversion happens per episode, never for the set.
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


class MiniImageNet(TensorClassDataset):
    """One split of mini-ImageNet from a learn2learn ``mini-imagenet-cache-{split}.pkl``.

    ``split`` is ``"train"``, ``"validation"`` (or ``"val"``) or ``"test"``. Images are held as
    ``uint8`` ``[N, 3, 84, 84]`` (:attr:`data`) and returned as float ``[k, 3, 84, 84]`` in
    ``[0, 1]``; classes are the wnids in sorted order (:meth:`class_name`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: ImageTransform | None = None,
    ) -> None:
        self.split = canonical_split(split)
        self.path = mini_imagenet_file(root, self.split)
        raw = read_pickle(self.path)
        data = hwc_to_chw_uint8(get_key(raw, "image_data", self.path), self.path)
        class_dict = get_key(raw, "class_dict", self.path)
        del raw
        if not isinstance(class_dict, dict) or not class_dict:
            raise CorruptDatasetError(
                f"class_dict in {self.path} is empty or not a dict; the file is corrupt"
            )
        names = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in class_dict)
        by_name = {
            (k.decode() if isinstance(k, bytes) else str(k)): v for k, v in class_dict.items()
        }
        groups = []
        for name in names:
            rows = np.asarray(by_name[name], dtype=np.int64).reshape(-1)
            if rows.size == 0 or rows.min() < 0 or rows.max() >= len(data):
                raise CorruptDatasetError(
                    f"class {name} in {self.path} lists rows outside 0..{len(data) - 1} (or none); "
                    "the file is corrupt or truncated"
                )
            groups.append(rows)
        super().__init__(data, groups, names, transform)


def mini_imagenet_file(root: str | os.PathLike[str] | None, split: str) -> Path:
    """The pickle of ``split``, or :class:`DatasetNotFoundError` listing where it was looked for."""
    split = canonical_split(split)
    names = [f"mini-imagenet-cache-{split}.pkl"]
    if split == "validation":
        names.append("mini-imagenet-cache-val.pkl")
    if root is None:
        raise DatasetNotFoundError(
            f"mini-ImageNet needs root=<folder containing {' / '.join(names)}>"
        )
    base = Path(root).expanduser()
    folders = [base, base / "mini-imagenet"]
    path = find_file(folders, names)
    if path is None:
        raise not_found(
            f"mini-ImageNet {split} split",
            folders,
            names,
            "No public URL with a published md5 exists, so it is not downloaded: get the "
            "learn2learn pickles (learn2learn.vision.datasets.MiniImagenet(root, mode=..., "
            "download=True) fetches them) and pass root=<their folder>",
        )
    return path


def mini_imagenet_splits(
    root: str | os.PathLike[str] | None,
    transform: ImageTransform | None = None,
    download: bool = False,
) -> dict[str, ClassDataset]:
    """``{"train", "validation", "test"}`` :class:`MiniImageNet` splits (64/16/20 classes).

    ``download`` is accepted for interface uniformity; there is no verified public URL, so
    missing files raise :class:`DatasetNotFoundError` naming the expected paths.
    """
    del download
    # Resolve every path first so a missing file is reported before gigabytes are unpickled.
    for split in SPLITS:
        mini_imagenet_file(root, split)
    return {split: MiniImageNet(root, split, transform) for split in SPLITS}  # type: ignore[arg-type]
