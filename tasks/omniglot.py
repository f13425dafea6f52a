"""Omniglot (Lake et al., "Human-level concept learning through probabilistic program induction",
Science 2015): 1623 handwritten characters from 50 alphabets, 20 drawings each.

On-disk format (docs/data-formats.md): ``<split>.zip`` or an extracted ``<split>/`` folder, in
``root`` or in ``root/omniglot-py`` (torchvision's layout), each holding
``<Alphabet>/<characterNN>/<id>.png`` (105x105, 1-bit, black strokes on white).

Preprocessing (docs/data-formats.md, the convention of MAML, Finn et al. 2017, and its successors):
convert to 8-bit grey, invert so that ink is 1 and background 0, resize to ``image_size`` with
Pillow's LANCZOS filter (as torchvision's ``Resize(28, interpolation=LANCZOS)`` in learn2learn's
Omniglot benchmark). Inverting before resizing keeps the background exactly 0 after resampling.
Images are stored once as a ``uint8`` tensor ``[N, 1, S, S]`` and scaled to ``[0, 1]`` on access.

Class order is deterministic: classes sorted by ``(alphabet, character)``, images within a class
sorted by file name. Class names are ``"Alphabet/characterNN"``.

Bundled data: the two "minimal" splits (``background_small1`` and ``background_small2``, 2.9 MB,
MIT, Lake's licence and attribution beside them) ship in :data:`PACKAGED_ROOT`. With
``root=None`` those two splits are read from there, md5-checked on every load; a given ``root``
always wins.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from tasks.dataset import (
    ClassDataset,
    ConcatClasses,
    ImageTransform,
    RotatedClasses,
    SubsetClasses,
    TensorClassDataset,
)
from tasks.download import check_md5, download_url, md5sum
from tasks.errors import CorruptDatasetError, DatasetNotFoundError

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{name}.zip"
# md5 of the official zips (listed in docs/data-formats.md).
OMNIGLOT_MD5: dict[str, str] = {
    "background": "68d2efa1b9178cc56df9314c21c6e718",
    "evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    "background_small1": "e704a628b5459e08445c13499850abc4",
    "background_small2": "b75a71a51d3b13f821f212756fe481fd",
}
SPLITS = tuple(OMNIGLOT_MD5)
# The two "minimal" background splits share the Greek and Latin alphabets (same files).
_OTHER_SMALL = {"background_small1": "background_small2", "background_small2": "background_small1"}

# Standard character split of the full benchmark: 1200 characters for meta-training (1100 train +
# 100 validation), the remaining 423 for testing (Finn et al. 2017; Santoro et al. 2016).
NUM_TRAIN_CHARACTERS = 1100
NUM_VALIDATION_CHARACTERS = 100

_RESAMPLE = Image.Resampling.LANCZOS

# The Omniglot minimal zips installed with the package (package data of ``tasks``).
PACKAGED_ROOT = Path(__file__).resolve().parent / "data" / "omniglot"
PACKAGED_SPLITS = ("background_small1", "background_small2")


def split_filename(split: str) -> str:
    """Base name of a split's zip/folder, e.g. ``images_background_small1``."""
    return f"images_{split}"


def split_url(split: str) -> str:
    """Official download URL of a split's zip."""
    return OMNIGLOT_URL.format(name=split_filename(split))


def packaged_split(split: str) -> Path:
    """The bundled zip of an Omniglot minimal split, md5-checked.

    Args:
        split: ``"background_small1"`` or ``"background_small2"``.

    Returns:
        The path of the zip inside the installed package.

    Raises:
        DatasetNotFoundError: ``split`` is not bundled, or the install lacks the file.
        CorruptDatasetError: the bundled zip's md5 differs from :data:`OMNIGLOT_MD5`.
    """
    _check_split(split)
    path = PACKAGED_ROOT / f"{split_filename(split)}.zip"
    if split not in PACKAGED_SPLITS:
        raise DatasetNotFoundError(
            f"no Omniglot root given and split {split!r} is not bundled (only "
            f"{', '.join(PACKAGED_SPLITS)} are): pass root=<folder holding images_{split}.zip "
            "or omniglot-py/> (with download=True to fetch the zip into it)"
        )
    if not path.is_file():
        raise DatasetNotFoundError(
            f"the bundled Omniglot split {path} is missing from this install: reinstall the "
            "package (pip install --force-reinstall npbml), or pass root=<folder holding "
            f"images_{split}.zip>"
        )
    # Checked on every load (2.9 MB, a few ms): a damaged install must not train on bad data.
    actual = md5sum(path)
    if actual != OMNIGLOT_MD5[split]:
        raise CorruptDatasetError(
            f"the bundled Omniglot split {path} is damaged: md5 {actual}, expected "
            f"{OMNIGLOT_MD5[split]}. Reinstall the package (pip install --force-reinstall "
            f"npbml), or pass root=<folder holding a good images_{split}.zip>"
        )
    return path


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown Omniglot split {split!r}; choose one of {', '.join(SPLITS)}")


def _search_dirs(root: Path) -> list[Path]:
    return [root, root / "omniglot-py"]


def locate_split(root: str | os.PathLike[str], split: str) -> Path | None:
    """The zip or folder holding ``split`` under ``root`` (or ``root/omniglot-py``), else None.

    A zip is preferred over an extracted folder: the zip can be checked (md5, CRCs), while a
    folder may be a partial extraction.
    """
    _check_split(split)
    name = split_filename(split)
    dirs = _search_dirs(Path(root))
    for d in dirs:
        if (d / f"{name}.zip").is_file():
            return d / f"{name}.zip"
    for d in dirs:
        if (d / name).is_dir():
            return d / name
    return None


def _not_found(root: Path, split: str) -> DatasetNotFoundError:
    name = split_filename(split)
    places = " or ".join(
        f"{d / name}.zip (or the extracted folder {d / name}/)" for d in _search_dirs(root)
    )
    return DatasetNotFoundError(
        f"Omniglot split {split!r} not found: expected {places}. Pass download=True to fetch "
        f"{split_url(split)} (md5 {OMNIGLOT_MD5[split]}) into {root}, or download it by hand."
    )


def _fix_hint(source: Path, split: str | None) -> str:
    md5 = f" (md5 {OMNIGLOT_MD5[split]})" if split in OMNIGLOT_MD5 else ""
    url = f" from {split_url(split)}" if split in OMNIGLOT_MD5 else ""
    return f"delete {source} and download it again{url}{md5}, e.g. with download=True"


def preprocess(image: Image.Image, image_size: int) -> np.ndarray:
    """One Omniglot drawing as ``uint8 [S, S]`` with ink = 255, background = 0 (see module doc)."""
    grey = ImageOps.invert(image.convert("L"))
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), _RESAMPLE)
    return np.array(grey, dtype=np.uint8)


def decode_image(data: bytes, image_size: int, where: str, fix: str) -> np.ndarray:
    """Decode PNG bytes and :func:`preprocess` them; unreadable bytes -> CorruptDatasetError."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return preprocess(im, image_size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptDatasetError(f"cannot read image {where}: {e}; {fix}") from e


# (alphabet, character, file name) -> callable returning the file's bytes
_Entry = tuple[str, str, str, Callable[[], bytes]]


def _is_junk(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def _zip_entries(zf: zipfile.ZipFile, source: Path, fix: str) -> list[_Entry]:
    """Images of a split zip; any leading folders (``images_background/``) are ignored."""
    pngs = []
    dirs = []
    for info in zf.infolist():
        parts = [p for p in info.filename.split("/") if p]
        if any(_is_junk(p) for p in parts):
            continue
        if info.is_dir():
            dirs.append(parts)
        elif parts[-1].lower().endswith(".png"):
            pngs.append((parts, info))
    if not pngs:
        raise CorruptDatasetError(f"{source} contains no PNG images; {fix}")
    depths = {len(p) for p, _ in pngs}
    if len(depths) != 1 or min(depths) < 3:
        raise CorruptDatasetError(
            f"{source} does not have the Omniglot layout <Alphabet>/<characterNN>/<id>.png "
            f"(found images at folder depths {sorted(depths)}); {fix}"
        )
    depth = depths.pop()
    # Character folders listed in the zip but holding no image: a damaged or partial archive.
    have = {tuple(p[:-1]) for p, _ in pngs}
    empty = sorted("/".join(d) for d in dirs if len(d) == depth - 1 and tuple(d) not in have)
    if empty:
        raise CorruptDatasetError(
            f"{source}: character folder {empty[0]} has no images "
            f"({len(empty)} empty in all); {fix}"
        )
    return [(p[-3], p[-2], p[-1], functools.partial(zf.read, info)) for p, info in pngs]


def _sorted_subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not _is_junk(p.name))


def _folder_entries(folder: Path, fix: str) -> list[_Entry]:
    entries: list[_Entry] = []
    for alpha in _sorted_subdirs(folder):
        for char in _sorted_subdirs(alpha):
            files = [
                f
                for f in char.iterdir()
                if f.is_file() and f.suffix.lower() == ".png" and not _is_junk(f.name)
            ]
            if not files:
                raise CorruptDatasetError(f"character folder {char} has no PNG images; {fix}")
            entries.extend((alpha.name, char.name, f.name, f.read_bytes) for f in files)
    if not entries:
        raise CorruptDatasetError(
            f"{folder} contains no <Alphabet>/<characterNN>/<id>.png images; {fix}"
        )
    return entries


def _decode_entries(
    entries: list[_Entry], image_size: int, source: Path, fix: str
) -> tuple[np.ndarray, list[str], list[str]]:
    """Decode sorted entries; returns (uint8 [N,S,S], per-image class names, per-image files)."""
    entries = sorted(entries, key=lambda e: e[:3])
    data = np.empty((len(entries), image_size, image_size), dtype=np.uint8)
    class_of, files = [], []
    for i, (alpha, char, fname, read) in enumerate(entries):
        where = f"{alpha}/{char}/{fname} in {source}"
        try:
            raw = read()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise CorruptDatasetError(f"cannot read {where}: {e}; {fix}") from e
        data[i] = decode_image(raw, image_size, where, fix)
        class_of.append(f"{alpha}/{char}")
        files.append(f"{alpha}/{char}/{fname}")
    return data, class_of, files


def _load(source: Path, image_size: int, split: str | None) -> tuple[np.ndarray, list, list]:
    fix = _fix_hint(source, split)
    if source.is_dir():
        return _decode_entries(_folder_entries(source, fix), image_size, source, fix)
    try:
        with zipfile.ZipFile(source) as zf:
            entries = _zip_entries(zf, source, fix)
            return _decode_entries(entries, image_size, source, fix)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise CorruptDatasetError(f"{source} is not a readable zip ({e}); {fix}") from e


@functools.lru_cache(maxsize=8)
def _load_zip_cached(
    source: str, mtime_ns: int, size: int, image_size: int, split: str | None
) -> tuple[np.ndarray, list, list]:
    # Keyed on the zip's mtime and size so a replaced file is re-read; ~25 MB for all of Omniglot
    # at 28x28. Folders are not cached: their mtime does not track the files inside.
    return _load(Path(source), image_size, split)


def load_split(
    source: str | os.PathLike[str], image_size: int = 28, split: str | None = None
) -> tuple[np.ndarray, list[str], list[str]]:
    """Decode every image of an Omniglot zip or folder.

    Returns ``(data, class_of_image, files)``: ``uint8 [N, S, S]`` (ink 255), the
    ``"Alphabet/characterNN"`` of each image and its ``"Alphabet/characterNN/id.png"`` path, in
    sorted order. Zips are cached in memory (keyed on path, mtime and size).
    """
    source = Path(source)
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if source.is_file():
        st = source.stat()
        return _load_zip_cached(
            str(source.resolve()), st.st_mtime_ns, st.st_size, int(image_size), split
        )
    if source.is_dir():
        return _load(source, int(image_size), split)
    raise DatasetNotFoundError(f"{source} does not exist")


class Omniglot(TensorClassDataset):
    """One Omniglot split as a :class:`~tasks.dataset.ClassDataset` (one class per character).

    ``split`` is ``"background"`` (964 characters, 30 alphabets), ``"evaluation"`` (659, 20),
    ``"background_small1"`` (136, 5) or ``"background_small2"`` (156, 5). ``root`` holds
    ``images_<split>.zip`` or its extracted folder, directly or in ``root/omniglot-py``;
    ``root=None`` reads the bundled copy of a minimal split (:func:`packaged_split`).
    ``download=True`` fetches a missing zip from the official repository into ``root`` and checks
    its md5; ``verify=True`` also checks the md5 of an existing zip.

    Attributes: ``alphabets`` (sorted alphabet names), ``class_alphabet`` (alphabet id of each
    class, ``int64 [num_classes]``), ``files`` (``"Alphabet/characterNN/id.png"`` of each image,
    aligned with ``data``), ``source`` (the zip or folder read).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        split: str = "background",
        image_size: int = 28,
        download: bool = False,
        verify: bool = False,
        transform: ImageTransform | None = None,
    ) -> None:
        _check_split(split)
        source: Path | None
        if root is None:  # the bundled minimal splits (see the module doc)
            source = packaged_split(split)
            root = PACKAGED_ROOT
        else:
            root = Path(root).expanduser()
            source = locate_split(root, split)
        if source is None:
            if not download:
                raise _not_found(root, split)
            name = split_filename(split)
            source = download_url(split_url(split), root / f"{name}.zip", OMNIGLOT_MD5[split])
        elif verify and source.is_file():
            check_md5(source, OMNIGLOT_MD5[split])
        data, class_of, files = load_split(source, image_size, split)
        # Rows are sorted by (alphabet, character, file): each class is one contiguous block.
        starts = [i for i in range(len(class_of)) if i == 0 or class_of[i] != class_of[i - 1]]
        names = [class_of[i] for i in starts]
        stops = starts[1:] + [len(class_of)]
        super().__init__(
            torch.from_numpy(data).unsqueeze(1),
            [np.arange(a, b) for a, b in zip(starts, stops)],
            names,
            transform,
        )
        self.root, self.split, self.image_size, self.source = root, split, int(image_size), source
        self.files = list(files)
        alpha_of_class = [n.split("/")[0] for n in names]
        self.alphabets = sorted(set(alpha_of_class))
        index = {a: i for i, a in enumerate(self.alphabets)}
        self.class_alphabet = np.asarray([index[a] for a in alpha_of_class], dtype=np.int64)
        self._digests: dict[int, str] = {}

    def alphabet(self, c: int) -> str:
        """Alphabet name of class ``c``."""
        self._check_class(c)
        return self.alphabets[int(self.class_alphabet[c])]

    def class_alphabets(self) -> list[str]:
        """Alphabet name of every class (for within-alphabet episodes)."""
        return [self.alphabets[int(a)] for a in self.class_alphabet]

    def class_digest(self, c: int) -> str:
        """sha1 of class ``c``'s decoded pixels: equal digests mean the same set of drawings."""
        if c not in self._digests:
            self._check_class(c)
            rows = self.class_indices[c]
            self._digests[c] = hashlib.sha1(self.data[rows].numpy().tobytes()).hexdigest()
        return self._digests[c]

    def __repr__(self) -> str:
        return (
            f"Omniglot(split={self.split!r}, {self.num_classes} characters from "
            f"{len(self.alphabets)} alphabets, {len(self.data)} images, "
            f"{self.image_size}x{self.image_size}, source={str(self.source)!r})"
        )


def _maybe_rotate(dataset: ClassDataset, rotate: bool) -> ClassDataset:
    return RotatedClasses(dataset) if rotate else dataset


def _iter_names(dataset: ClassDataset) -> Iterator[str]:
    return (dataset.class_name(c) for c in range(dataset.num_classes))


def omniglot_splits(
    root: str | os.PathLike[str] | None,
    image_size: int = 28,
    rotations: bool = True,
    seed: int = 0,
    download: bool = False,
    rotate_evaluation: bool = False,
    verify: bool = False,
    num_train: int = NUM_TRAIN_CHARACTERS,
    num_validation: int = NUM_VALIDATION_CHARACTERS,
) -> dict[str, ClassDataset]:
    """The standard Omniglot benchmark: train/validation/test over all 1623 characters.

    The characters of ``background`` and ``evaluation`` are pooled, sorted by name, and permuted
    with ``numpy.random.default_rng(seed)``; the first ``num_train`` (1100) are meta-train, the
    next ``num_validation`` (100) validation and the rest (423) test, the split sizes of Finn et
    al. (2017, MAML), whose exact permutation (Python's ``random`` over an OS listing) cannot be
    reproduced portably. With ``rotations`` every meta-train character at 0/90/180/270 degrees
    is its own class (docs/methods/protocol.md), so train has 4400 classes. Validation and test are
    not rotated unless ``rotate_evaluation=True`` (MAML's and learn2learn's code rotate them too;
    this toolkit uses rotation classes at meta-train only).
    """
    bg = Omniglot(root, "background", image_size, download=download, verify=verify)
    ev = Omniglot(root, "evaluation", image_size, download=download, verify=verify)
    pooled = ConcatClasses([bg, ev])
    n = pooled.num_classes
    if num_train < 1 or num_validation < 1 or num_train + num_validation >= n:
        raise ValueError(
            f"num_train={num_train} and num_validation={num_validation} must be >= 1 and leave "
            f"test characters out of the {n} available"
        )
    by_name = np.argsort(np.asarray(list(_iter_names(pooled))), kind="stable")
    order = by_name[np.random.default_rng(seed).permutation(n)]
    train = np.sort(order[:num_train])
    val = np.sort(order[num_train : num_train + num_validation])
    test = np.sort(order[num_train + num_validation :])
    return {
        "train": _maybe_rotate(SubsetClasses(pooled, train), rotations),
        "validation": _maybe_rotate(SubsetClasses(pooled, val), rotate_evaluation),
        "test": _maybe_rotate(SubsetClasses(pooled, test), rotate_evaluation),
    }


def omniglot_minimal_splits(
    root: str | os.PathLike[str] | None,
    train: str = "background_small1",
    image_size: int = 28,
    rotations: bool = True,
    seed: int = 0,
    validation_fraction: float = 0.2,
    download: bool = False,
    rotate_evaluation: bool = False,
    verify: bool = False,
) -> dict[str, ClassDataset]:
    """Omniglot from the two "minimal" background splits only (Lake et al. 2015's small sets).

    Meta-train and validation come from the characters of ``train`` (``background_small1``,
    136 characters, or ``background_small2``, 156): its characters in sorted order are permuted
    with ``numpy.random.default_rng(seed)`` and the first ``round(validation_fraction * n)``
    become validation (27 of 136 by default), the rest meta-train (109). Test is every character
    of the *other* small split that is not a character of ``train``: a character is excluded when
    its ``"Alphabet/characterNN"`` name or its pixels (:meth:`Omniglot.class_digest`) match one
    of ``train``'s. In the official zips the shared alphabets Greek and Latin (50 characters)
    hold byte-identical files in both, so the test set is the 106 characters of Japanese
    (katakana), Sanskrit and Tagalog for ``train="background_small1"`` (86 of Balinese, Early
    Aramaic and Korean for ``"background_small2"``). Rotations as in :func:`omniglot_splits`.
    ``root=None`` reads the two zips bundled with the package (md5-checked on every load).
    """
    if train not in _OTHER_SMALL:
        raise ValueError(f"train must be 'background_small1' or 'background_small2', got {train!r}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    tr = Omniglot(root, train, image_size, download=download, verify=verify)
    other = Omniglot(root, _OTHER_SMALL[train], image_size, download=download, verify=verify)
    n = tr.num_classes
    n_val = int(round(validation_fraction * n))
    if not 1 <= n_val <= n - 1:
        raise ValueError(
            f"validation_fraction={validation_fraction} of {n} characters gives {n_val} "
            "validation characters; choose a fraction that leaves at least one in each split"
        )
    perm = np.random.default_rng(seed).permutation(n)
    val_ids, train_ids = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    train_names = {tr.class_name(c): c for c in range(n)}
    train_digests = {tr.class_digest(c) for c in range(n)}
    test_ids = []
    for c in range(other.num_classes):
        name = other.class_name(c)
        same_name = name in train_names
        same_pixels = other.class_digest(c) in train_digests
        if same_name and not same_pixels:
            warnings.warn(
                f"{name} is in both {train} and {other.split} but its images differ; it is "
                "left out of the test split to be safe",
                stacklevel=2,
            )
        if not (same_name or same_pixels):
            test_ids.append(c)
    if not test_ids:
        raise CorruptDatasetError(
            f"every character of {other.split} also appears in {train}: no test characters "
            f"remain. Check that {other.source} is the official {other.split} split."
        )
    return {
        "train": _maybe_rotate(SubsetClasses(tr, train_ids), rotations),
        "validation": _maybe_rotate(SubsetClasses(tr, val_ids), rotate_evaluation),
        "test": _maybe_rotate(SubsetClasses(other, test_ids), rotate_evaluation),
    }
