"""CIFAR-FS (Bertinetto et al., 2019): CIFAR-100 classes split 64/16/20 for few-shot learning.

Three on-disk layouts are read, searched for in ``root``, ``root/cifarfs``, ``root/CIFAR-FS``,
``root/cifar-fs`` and ``root/CIFAR_FS`` (in that order, first match wins):

1. Bertinetto et al.'s layout, as in learn2learn's ``cifarfs.zip``::

       cifar100/data/<class>/*.png
       cifar100/splits/bertinetto/{train,val,test}.txt    (one class name per line)

   (the ``cifar100`` folder itself may also be given as ``root``);
2. learn2learn's processed copy: ``processed/{train,val,test}/<class>/*.png``;
3. MetaOptNet's pickles: ``CIFAR_FS_{train,val,test}.pickle`` (the FC100 format).

Layouts 1 and 2 decode the 32 x 32 PNGs lazily (``cache=True`` keeps them in memory after first
use, about 180 MB for the whole set); layout 3 holds ``uint8`` tensors. The literature split has
64/16/20 classes of 600 images; the loader reads whatever the files hold. There is no public URL
with a published md5, so nothing is downloaded: learn2learn's
``learn2learn.vision.datasets.CIFARFS(root)`` fetches and unpacks layout 1.
"""

from __future__ import annotations

import os
from pathlib import Path

from tasks.dataset import ClassDataset, ImageTransform
from tasks.errors import CorruptDatasetError, DatasetNotFoundError
from tasks.fc100 import read_data_labels_pickle
from tasks.folder import ImageFolderClasses
from tasks.miniimagenet import SPLITS

_SHORT = {"train": "train", "validation": "val", "test": "test"}
_SUBDIRS = ("", "cifarfs", "CIFAR-FS", "cifar-fs", "CIFAR_FS")


def read_split_file(path: Path) -> list[str]:
    """Class names listed in a Bertinetto split file (one per line; blank lines ignored)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptDatasetError(f"cannot read split file {path}: {e}") from e
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise CorruptDatasetError(
            f"split file {path} lists no classes; restore it from the dataset"
        )
    if len(set(names)) != len(names):
        raise CorruptDatasetError(f"split file {path} lists a class twice; restore it")
    return names


def _bertinetto_dir(folder: Path) -> Path | None:
    for cand in (folder / "cifar100", folder):
        split_dir = cand / "splits" / "bertinetto"
        if (cand / "data").is_dir() and all(
            (split_dir / f"{s}.txt").is_file() for s in _SHORT.values()
        ):
            return cand
    return None


def cifar_fs_splits(
    root: str | os.PathLike[str] | None,
    transform: ImageTransform | None = None,
    cache: bool = False,
    download: bool = False,
) -> dict[str, ClassDataset]:
    """``{"train", "validation", "test"}`` CIFAR-FS splits (64/16/20 classes) from any layout above.

    Images are float ``[k, 3, 32, 32]`` in ``[0, 1]``; ``transform`` is applied to every batch.
    ``download`` is accepted for interface uniformity; missing files raise
    :class:`DatasetNotFoundError` naming the paths that were tried.
    """
    del download
    if root is None:
        raise DatasetNotFoundError(
            "CIFAR-FS needs root=<folder containing cifar100/data and cifar100/splits/bertinetto>"
        )
    base = Path(root).expanduser()
    tried: list[str] = []
    for sub in _SUBDIRS:
        folder = base / sub if sub else base
        if not folder.is_dir():
            tried.append(str(folder / "cifar100"))
            continue
        c100 = _bertinetto_dir(folder)
        if c100 is not None:
            out: dict[str, ClassDataset] = {}
            for split in SPLITS:
                names = read_split_file(c100 / "splits" / "bertinetto" / f"{_SHORT[split]}.txt")
                out[split] = ImageFolderClasses(
                    c100 / "data", channels=3, classes=names, cache=cache, transform=transform
                )
            return out
        processed = folder / "processed"
        if all((processed / s).is_dir() for s in _SHORT.values()):
            return {
                split: ImageFolderClasses(
                    processed / _SHORT[split], channels=3, cache=cache, transform=transform
                )
                for split in SPLITS
            }
        pickles = {split: folder / f"CIFAR_FS_{_SHORT[split]}.pickle" for split in SPLITS}
        if all(p.is_file() for p in pickles.values()):
            return {split: read_data_labels_pickle(p, transform) for split, p in pickles.items()}
        tried += [
            str(folder / "cifar100" / "data") + " + " + str(folder / "cifar100/splits/bertinetto"),
            str(processed / "{train,val,test}"),
            str(folder / "CIFAR_FS_{train,val,test}.pickle"),
        ]
    raise DatasetNotFoundError(
        f"CIFAR-FS not found under {base}; looked for {'; '.join(tried)}. No public URL with a "
        "published md5 exists, so it is not downloaded: get learn2learn's cifarfs.zip "
        "(learn2learn.vision.datasets.CIFARFS(root) fetches and unpacks it) or MetaOptNet's "
        "CIFAR_FS_*.pickle files and pass root=<their folder>"
    )
