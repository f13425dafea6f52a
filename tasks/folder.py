"""Generic image-folder datasets: one folder per class, any image format Pillow reads.

Layout (docs/data-formats.md, "Generic image folder")::

    ROOT/<class name>/<image>.{png,jpg,bmp,gif,...}

Images are decoded lazily (per episode) with Pillow; ``cache=True`` keeps every decoded image in
memory as ``uint8`` after its first use. :func:`folder_splits` turns a folder into a
train/validation/test benchmark, either from ``train/``, ``val/`` (or ``validation/``) and
``test/`` subfolders or by a seeded split of the classes of a single folder.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tasks.dataset import ClassDataset, ImageTransform
from tasks.errors import CorruptDatasetError, DatasetNotFoundError

SPLIT_DIR_NAMES = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}


def readable_image_extensions() -> frozenset[str]:
    """File extensions (lower case, with dot) of every format this Pillow build can *read*."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _size_hw(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    hw = [image_size, image_size] if isinstance(image_size, int) else [int(s) for s in image_size]
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size}")
    return hw[0], hw[1]


def decode_image(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray,
    channels: int | None = None,
    image_size: int | Sequence[int] | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Decode one image (a path or encoded bytes) into a ``uint8`` tensor ``[C, H, W]``.

    ``channels`` 1 converts to greyscale, 3 to RGB; ``None`` keeps greyscale images greyscale
    and converts everything else (palette, RGBA, CMYK, ...) to RGB. ``image_size`` resizes with
    Pillow's bilinear filter (anti-aliased when shrinking). Undecodable input raises
    :class:`CorruptDatasetError` naming ``name`` (or the path).
    """
    label = name if name is not None else str(source) if isinstance(source, str | Path) else "image"
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels}")
    img: Image.Image  # Image.open's ImageFile, then convert's and resize's plain Image
    try:
        if isinstance(source, str | os.PathLike):
            img = Image.open(source)
        else:
            # C-order bytes of an array (as memoryview(...).tobytes() gives), else the bytes.
            data = source.tobytes() if isinstance(source, np.ndarray) else bytes(source)
            img = Image.open(io.BytesIO(data))
        with img:
            if channels == 1 or (channels is None and img.mode in ("1", "L", "I;16", "I", "F")):
                img = img.convert("L")
            else:
                img = img.convert("RGB")
            hw = _size_hw(image_size)
            if hw is not None and img.size != (hw[1], hw[0]):
                img = img.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
            arr = np.array(img, dtype=np.uint8)  # a writable copy, detached from Pillow
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # Pillow reports truncated/garbled files as OSError or SyntaxError depending on the codec.
        raise CorruptDatasetError(
            f"cannot decode image {label}: {e}. The file is truncated or not an image; delete or "
            "replace it (or re-extract the dataset)"
        ) from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def list_class_folders(root: Path) -> list[str]:
    """Names of the non-hidden subfolders of ``root``, sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder: Path, extensions: frozenset[str] | None = None) -> list[Path]:
    """The image files of ``folder`` (sorted; hidden files and non-image extensions ignored)."""
    ext = readable_image_extensions() if extensions is None else extensions
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in ext
    )


class ImageFolderClasses(ClassDataset):
    """A :class:`ClassDataset` over ``root/<class>/<image>`` files, decoded lazily with Pillow.

    Classes are the non-hidden subfolders of ``root`` in sorted order (or the folders named in
    ``classes``, in that order); the images of a class are its files with an extension Pillow
    can read (sorted by name; hidden files and other files such as ``.txt`` are ignored).

    ``channels`` (1 or 3) and ``image_size`` (int or ``(height, width)``) fix the output; when
    ``channels`` is ``None`` it is taken from the first image (greyscale -> 1, else 3), and when
    ``image_size`` is ``None`` every image must have the size of the first one. ``cache=True``
    keeps decoded images (``uint8``) in memory. ``transform`` is applied to every batch returned
    by :meth:`images` (float ``[k, C, H, W]`` in ``[0, 1]``).

    Raises :class:`DatasetNotFoundError` when ``root`` (or a listed class folder) is missing and
    :class:`CorruptDatasetError` for a class folder with no images or an undecodable image.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int | Sequence[int] | None = None,
        channels: int | None = None,
        classes: Sequence[str] | None = None,
        cache: bool = False,
        transform: ImageTransform | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetNotFoundError(
                f"image folder {self.root} does not exist; pass the folder that holds one "
                "subfolder per class (ROOT/<class>/<image files>)"
            )
        if classes is None:
            classes = list_class_folders(self.root)
            if not classes:
                raise DatasetNotFoundError(
                    f"{self.root} has no class subfolders; expected ROOT/<class>/<image files>"
                )
        self.class_names = [str(c) for c in classes]
        self.image_size = _size_hw(image_size)
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {channels}")
        extensions = readable_image_extensions()
        self.files: list[list[Path]] = []
        for name in self.class_names:
            folder = self.root / name
            if not folder.is_dir():
                raise DatasetNotFoundError(
                    f"class folder {folder} does not exist (class {name!r}); check the class "
                    "list or split file against the folders on disk"
                )
            files = list_images(folder, extensions)
            if not files:
                raise CorruptDatasetError(
                    f"class folder {folder} contains no images (readable extensions include "
                    ".png, .jpg, .bmp, .gif); remove the empty folder or add its images"
                )
            self.files.append(files)
        self.channels = channels
        self.transform = transform
        self._cache: dict[tuple[int, int], torch.Tensor] | None = {} if cache else None
        self._shape: tuple[int, int, int] | None = None
        if self.channels is None or self.image_size is None:
            # Fix the output format from the first image so every later image can be checked.
            first = self._load(0, 0)
            self.channels = int(first.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.files)

    def num_images(self, c: int) -> int:
        return len(self.files[c])

    def class_name(self, c: int) -> str:
        return self.class_names[c]

    def path(self, c: int, i: int) -> Path:
        """The file of image ``i`` of class ``c``."""
        return self.files[c][i]

    def _load(self, c: int, i: int) -> torch.Tensor:
        key = (c, i)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        path = self.files[c][i]
        x = decode_image(path, self.channels, self.image_size, name=str(path))
        shape = tuple(x.shape)
        if self._shape is None:
            self._shape = shape  # type: ignore[assignment]
        elif shape != self._shape:
            raise CorruptDatasetError(
                f"image {path} has shape {shape} (C, H, W) but earlier images have "
                f"{self._shape}; pass image_size=(H, W) to resize every image (and channels=1 "
                "or 3 to fix the number of channels)"
            )
        if self._cache is not None:
            self._cache[key] = x
        return x

    def images(self, c: int, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        self._check_class(c)
        n = len(self.files[c])
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        for i in idx:
            if not -n <= i < n:
                raise IndexError(f"image {i} out of range: class {c} has {n} images")
        x = torch.stack([self._load(c, i % n) for i in idx]).float().div_(255.0)
        return self.transform(x) if self.transform is not None else x


def _split_dirs(root: Path) -> dict[str, Path] | None:
    found: dict[str, Path] = {}
    for split, names in SPLIT_DIR_NAMES.items():
        for name in names:
            if (root / name).is_dir():
                found[split] = root / name
                break
    return found if len(found) == 3 else None


def split_classes(
    names: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, list[str]]:
    """Seeded train/validation/test partition of class ``names`` with the given ``fractions``.

    The classes are sorted, permuted with ``numpy.random.default_rng(seed)``, and cut into
    ``round(f_train * n)``, ``round(f_val * n)`` and the remaining classes; every split gets at
    least one class, so at least 3 classes are needed.
    """
    names = sorted(names)
    n = len(names)
    if len(fractions) != 3 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers, got {fractions}")
    if n < 3:
        raise CorruptDatasetError(
            f"a seeded train/validation/test split needs at least 3 class folders, found {n}; "
            "add classes or provide train/, val/ and test/ subfolders"
        )
    total = float(sum(fractions))
    n_train = min(max(1, round(fractions[0] / total * n)), n - 2)
    n_val = min(max(1, round(fractions[1] / total * n)), n - n_train - 1)
    perm = np.random.default_rng(seed).permutation(n)
    order = [names[i] for i in perm]
    return {
        "train": sorted(order[:n_train]),
        "validation": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def folder_splits(
    root: str | os.PathLike[str] | None,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    cache: bool = False,
    transform: ImageTransform | None = None,
    fractions: Sequence[float] = (0.64, 0.16, 0.20),
    split_seed: int = 0,
    download: bool = False,
) -> dict[str, ClassDataset]:
    """Train/validation/test :class:`ImageFolderClasses` from a folder of class folders.

    Two layouts are recognised:

    * ``root/train/<class>/``, ``root/val/<class>/`` (or ``root/validation/``) and
      ``root/test/<class>/``: each subfolder is one split;
    * otherwise ``root/<class>/``: the classes are split by :func:`split_classes` with
      ``fractions`` (default 64/16/20, the mini-ImageNet proportions) and ``split_seed``, so the
      split is the same on every machine.

    ``image_size``, ``channels``, ``cache`` and ``transform`` go to every split. There is nothing
    to download (``download`` is accepted for interface uniformity and ignored).
    """
    del download
    if root is None:
        raise DatasetNotFoundError(
            "the folder benchmark needs root=<folder>: ROOT/{train,val,test}/<class>/<images> or "
            "ROOT/<class>/<images>"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image folder {root} does not exist; expected ROOT/{{train,val,test}}/<class>/ or "
            "ROOT/<class>/ with image files"
        )

    def split(path: Path, classes: Sequence[str] | None = None) -> ClassDataset:
        return ImageFolderClasses(path, image_size, channels, classes, cache, transform)

    dirs = _split_dirs(root)
    if dirs is not None:
        return {name: split(path) for name, path in dirs.items()}
    names = list_class_folders(root)
    if not names:
        raise DatasetNotFoundError(
            f"{root} has no class subfolders; expected ROOT/{{train,val,test}}/<class>/ or "
            "ROOT/<class>/ with image files"
        )
    parts = split_classes(names, fractions, split_seed)
    return {name: split(root, cls) for name, cls in parts.items()}
