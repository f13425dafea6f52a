"""Writers of small datasets in the exact on-disk formats of docs/data-formats.md.

Every writer returns the images it wrote, keyed by split and class name, as ``uint8``
``[n, 3, H, W]`` arrays in file order, so tests can compare what a loader returns with what was
written. Pixel values are random (seeded), so a mix-up of classes or rows cannot go unnoticed.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

Written = dict[str, dict[str, np.ndarray]]  # split -> class name -> uint8 [n, 3, H, W]


def random_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``n`` random RGB images, ``uint8`` ``[n, size, size, 3]``."""
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def png_bytes(img_hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img_hwc).save(buf, format="PNG")
    return buf.getvalue()


def _chw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def write_mini_imagenet(
    root: Path,
    classes: int = 6,
    per_class: int = 8,
    size: int = 84,
    val_name: str = "validation",
    seed: int = 0,
) -> Written:
    """``mini-imagenet-cache-{train,<val_name>,test}.pkl`` with shuffled rows per class."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out: Written = {}
    wnid = 1000
    for split, fname in (("train", "train"), ("validation", val_name), ("test", "test")):
        n = classes * per_class
        data = random_images(rng, n, size)
        rows = rng.permutation(n)  # rows of a class are not contiguous, as in a shuffled cache
        # wnids inserted in reverse order so a loader must sort them itself.
        names = [f"n{wnid + k:08d}" for k in range(classes)][::-1]
        wnid += classes
        class_dict = {
            name: rows[k * per_class : (k + 1) * per_class].tolist() for k, name in enumerate(names)
        }
        with open(root / f"mini-imagenet-cache-{fname}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=4)
        out[split] = {name: _chw(data[r]) for name, r in class_dict.items()}
    return out


def write_tiered_imagenet(
    root: Path,
    classes: int = 6,
    per_class: int = 8,
    size: int = 84,
    as_array: bool = False,
    val_prefix: str = "val",
    seed: int = 0,
) -> Written:
    """``{train,val,test}_images_png.pkl`` (PNG bytes) and ``{split}_labels.pkl`` (interleaved)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out: Written = {}
    for split, prefix in (("train", "train"), ("validation", val_prefix), ("test", "test")):
        n = classes * per_class
        data = random_images(rng, n, size)
        labels = rng.permutation(np.repeat(np.arange(classes), per_class))
        pngs = [png_bytes(img) for img in data]
        images: object = pngs
        if as_array:
            # The original files hold an object array of uint8 arrays (cv2.imencode output).
            arr = np.empty(n, dtype=object)
            for i, b in enumerate(pngs):
                arr[i] = np.frombuffer(b, dtype=np.uint8)
            images = arr
        with open(root / f"{prefix}_images_png.pkl", "wb") as f:
            pickle.dump(images, f, protocol=4)
        strs = [f"class_{split}_{k}" for k in range(classes)]
        labels_dict = {
            "label_specific": labels.astype(np.int64),
            "label_general": labels // 2,
            "label_specific_str": strs,
        }
        with open(root / f"{prefix}_labels.pkl", "wb") as f:
            pickle.dump(labels_dict, f, protocol=4)
        out[split] = {strs[k]: _chw(data[labels == k]) for k in range(classes)}
    return out


def write_image_folder(
    root: Path,
    classes: list[str],
    per_class: int = 8,
    size: int = 32,
    fmt: str = "png",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``root/<class>/<i:03d>.<fmt>`` RGB images; returns class -> uint8 ``[n, 3, H, W]``."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        data = random_images(rng, per_class, size)
        for i, img in enumerate(data):
            Image.fromarray(img).save(folder / f"{i:03d}.{fmt}")
        out[name] = _chw(data)
    return out


def write_split_folders(root: Path, seed: int = 0) -> None:
    """``root/{train,val,test}/<class>/<i>.png``: 4 / 3 / 3 classes of four 16x16 grayscale
    images each, a fixed pattern per class plus noise (a tiny ``data.name: folder`` dataset)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 4), ("val", 3), ("test", 3)):
        for c in range(n):
            d = root / split / f"{split}{c}"
            d.mkdir(parents=True)
            proto = rng.integers(0, 256, (16, 16))
            for i in range(4):
                img = np.clip(proto + rng.normal(0, 30, (16, 16)), 0, 255).astype(np.uint8)
                Image.fromarray(img, mode="L").save(d / f"{i}.png")


CIFAR_FS_CLASSES = {
    "train": ["apple", "aquarium_fish", "bear", "bee", "beetle", "bicycle"],
    "validation": ["otter", "pine_tree", "plain", "plate", "poppy", "porcupine"],
    "test": ["baby", "bed", "bowl", "boy", "bridge", "bus"],
}


def write_cifar_fs(root: Path, per_class: int = 8, seed: int = 0) -> Written:
    """Bertinetto layout: ``root/cifar100/data/<class>/*.png`` + ``splits/bertinetto/*.txt``."""
    c100 = root / "cifar100"
    out: Written = {}
    split_dir = c100 / "splits" / "bertinetto"
    split_dir.mkdir(parents=True, exist_ok=True)
    for k, (split, names) in enumerate(CIFAR_FS_CLASSES.items()):
        out[split] = write_image_folder(c100 / "data", names, per_class, 32, "png", seed + k)
        short = "val" if split == "validation" else split
        # Trailing newline and blank line as in hand-edited split files.
        (split_dir / f"{short}.txt").write_text("\n".join(names) + "\n\n")
    return out


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol-2 pickler that writes ``bytes`` as Python 2 ``str`` (``BINSTRING``) opcodes.

    This reproduces what Python 2 wrote for numpy buffers and str dict keys: reading such a file
    in Python 3 without ``encoding="latin1"`` fails on any byte >= 128.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def dump_py2(obj: object, path: Path) -> None:
    """Pickle ``obj`` like Python 2 would (protocol 2, byte strings as ``str``)."""
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def write_data_labels_pickles(
    root: Path,
    prefix: str = "FC100",
    classes: int = 6,
    per_class: int = 8,
    size: int = 32,
    seed: int = 0,
) -> Written:
    """MetaOptNet ``{prefix}_{train,val,test}.pickle`` written like Python 2 (``latin1`` needed).

    Labels are CIFAR-100-style global ids (distinct across splits), keys are Python 2 ``str``.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out: Written = {}
    for k, split in enumerate(("train", "validation", "test")):
        n = classes * per_class
        data = random_images(rng, n, size)
        labels = rng.permutation(np.repeat(np.arange(classes) + 10 * k, per_class))
        short = "val" if split == "validation" else split
        dump_py2({b"data": data, b"labels": labels.tolist()}, root / f"{prefix}_{short}.pickle")
        out[split] = {str(c): _chw(data[labels == c]) for c in sorted(set(labels.tolist()))}
    return out
