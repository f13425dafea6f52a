"""IDX files: MNIST, Fashion-MNIST and KMNIST (docs/data-formats.md).

The IDX format (LeCun et al., the MNIST distribution): a 4-byte big-endian magic number
``0x0000 TT DD`` (``TT`` the element type, ``0x08`` = unsigned byte; ``DD`` the number of
dimensions), then ``DD`` big-endian int32 sizes, then the data. Images are ``0x00000803``
(``[N, rows, cols]``), labels ``0x00000801`` (``[N]``). Files may be raw or gzip-compressed
(detected from the content, not the name).

Two layouts are searched: torchvision's ``ROOT/<FashionMNIST|MNIST|KMNIST>/raw/`` (also ``ROOT``
itself) and, for Fashion-MNIST, Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist/``, MIT licence), which makes real data installable offline.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.errors import CorruptDatasetError, DatasetNotFoundError

#: Element type code of unsigned bytes, the only type the MNIST family uses.
UBYTE = 0x08
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
GZIP_MAGIC = b"\x1f\x8b"
SPLITS = {"train": "train", "test": "t10k"}


@dataclass(frozen=True)
class IDXSpec:
    """Where one IDX dataset lives: torchvision's folder name and system-wide install paths."""

    torchvision_dir: str
    system_dirs: tuple[str, ...]
    install_hint: str
    num_classes: int = 10


DATASETS: dict[str, IDXSpec] = {
    "fashion-mnist": IDXSpec(
        "FashionMNIST",
        ("/usr/share/datasets/fashion-mnist",),
        "apt-get install dataset-fashion-mnist (Debian/Ubuntu, offline), or pass root= a folder "
        "holding FashionMNIST/raw/ (torchvision's layout)",
    ),
    "mnist": IDXSpec(
        "MNIST",
        ("/usr/share/datasets/mnist",),
        "pass root= a folder holding MNIST/raw/ (torchvision's layout) or the four IDX files",
    ),
    "kmnist": IDXSpec(
        "KMNIST",
        (),
        "pass root= a folder holding KMNIST/raw/ (torchvision's layout) or the four IDX files",
    ),
}


def canonical_name(name: str) -> str:
    key = name.lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown IDX dataset {name!r}; use one of {sorted(DATASETS)}")
    return key


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise CorruptDatasetError(
            f"{path}: gzip data cannot be decompressed ({e}); the file is truncated or damaged, "
            "delete it and reinstall/download it"
        ) from e


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a uint8 array of the shape its header states.

    Args:
        path: the file.
        expected_magic: ``IMAGES_MAGIC`` or ``LABELS_MAGIC`` to insist on one kind; ``None``
            accepts any unsigned-byte IDX file.

    Returns:
        A read-only-safe (copied) ``np.uint8`` array of shape ``header sizes``.

    Raises:
        CorruptDatasetError: bad magic number, unsupported element type, a truncated header, or a
            data length that differs from the product of the header's sizes (the message names
            the file, what was found and what was expected).
    """
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 4:
        raise CorruptDatasetError(
            f"{p}: {len(data)} bytes, too short for an IDX header; re-fetch it"
        )
    magic = struct.unpack(">I", data[:4])[0]
    zero, dtype, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or dtype != UBYTE or ndim == 0:
        raise CorruptDatasetError(
            f"{p}: magic number 0x{magic:08x} is not an unsigned-byte IDX header (expected "
            f"0x{IMAGES_MAGIC:08x} for images or 0x{LABELS_MAGIC:08x} for labels); is this an "
            "HTML error page or another format? Replace the file"
        )
    if expected_magic is not None and magic != expected_magic:
        kind = "images" if expected_magic == IMAGES_MAGIC else "labels"
        raise CorruptDatasetError(
            f"{p}: magic number 0x{magic:08x} but an {kind} file needs 0x{expected_magic:08x}; "
            "the images and labels files may be swapped"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDatasetError(f"{p}: header of {ndim} sizes is truncated; re-fetch the file")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise CorruptDatasetError(
            f"{p}: header says shape {tuple(shape)} ({expected} bytes of data) but the file has "
            f"{len(data) - header}; the file is truncated or damaged, re-fetch it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def candidate_dirs(name: str, root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders searched for ``name``'s files, in order (``root`` layouts, then the system's)."""
    spec = DATASETS[canonical_name(name)]
    dirs: list[Path] = []
    if root is not None:
        r = Path(root)
        dirs += [r / spec.torchvision_dir / "raw", r / "raw", r]
    dirs += [Path(d) for d in spec.system_dirs]
    return dirs


def _find_file(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for candidate in (d / f"{stem}.gz", d / stem):
            if candidate.is_file():
                return candidate
    return None


def find_idx_files(
    name: str, split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[Path, Path]:
    """``(images, labels)`` paths of one split (``"train"`` or ``"test"``) of ``name``.

    Raises:
        DatasetNotFoundError: neither file layout is present; the message lists every folder
            searched and how to install the data.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    key = canonical_name(name)
    dirs = candidate_dirs(key, root)
    prefix = SPLITS[split]
    images = _find_file(dirs, f"{prefix}-images-idx3-ubyte")
    labels = _find_file(dirs, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        missing = [n for n, f in (("images", images), ("labels", labels)) if f is None]
        searched = ", ".join(str(d) for d in dirs) or "(no folder: root not given)"
        raise DatasetNotFoundError(
            f"{key} {split} {' and '.join(missing)} ({prefix}-*-idx?-ubyte[.gz]) not found in: "
            f"{searched}. Fix: {DATASETS[key].install_hint}"
        )
    return images, labels


def load_idx(
    name: str, split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, rows, cols]`` and labels ``int64 [N]`` of one split.

    Checks that both files have the same ``N`` and that every label is a valid class.
    """
    key = canonical_name(name)
    images_path, labels_path = find_idx_files(key, split, root)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise CorruptDatasetError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; the two files come from different releases, re-fetch both"
        )
    num_classes = DATASETS[key].num_classes
    if len(labels) and int(labels.max()) >= num_classes:
        raise CorruptDatasetError(
            f"{labels_path}: label {int(labels.max())} outside 0..{num_classes - 1}; "
            "the labels file is damaged, re-fetch it"
        )
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def load_idx_float(
    name: str, split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`load_idx` with images as ``float32 [N, 1, rows, cols]`` in ``[0, 1]``."""
    images, labels = load_idx(name, split, root)
    return images.unsqueeze(1).float().div_(255.0), labels
