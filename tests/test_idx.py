"""IDX loader (tasks/idx.py): tiny files written here, raw and gzip, both layouts, bad headers."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.errors import CorruptDatasetError, DatasetNotFoundError
from tasks.idx import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    candidate_dirs,
    find_idx_files,
    load_idx,
    load_idx_float,
    read_idx,
)


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file written independently of the loader: magic, big-endian sizes, uint8 data."""
    magic = magic if magic is not None else (0x0800 | array.ndim)
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_split(folder: Path, prefix: str, n: int, seed: int, gz: bool) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in (
        (f"{prefix}-images-idx3-ubyte", images),
        (f"{prefix}-labels-idx1-ubyte", labels),
    ):
        data = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_torchvision_layout_raw_and_gzip(tmp_path, gz):
    images, labels = write_split(tmp_path / "FashionMNIST" / "raw", "train", 7, 0, gz)
    x, y = load_idx("fashion-mnist", "train", tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (7, 28, 28)
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)
    assert y.dtype == torch.int64
    xf, _ = load_idx_float("FashionMNIST", "train", tmp_path)
    assert xf.shape == (7, 1, 28, 28) and float(xf.max()) <= 1.0
    assert torch.allclose(xf[:, 0] * 255, x.float())


def test_flat_folder_and_other_names(tmp_path):
    images, labels = write_split(tmp_path, "t10k", 3, 1, gz=False)
    for name in ("mnist", "kmnist", "fashion_mnist"):
        x, y = load_idx(name, "test", tmp_path)
        assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)


def test_debian_path_is_searched():
    assert Path("/usr/share/datasets/fashion-mnist") in candidate_dirs("fashion-mnist")
    assert candidate_dirs("kmnist") == []


def test_missing_files_name_the_folders_and_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="kmnist train images and labels.*KMNIST/raw"):
        find_idx_files("kmnist", "train", tmp_path)
    write_split(tmp_path, "train", 2, 0, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match="train labels"):
        find_idx_files("mnist", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown IDX dataset"):
        load_idx("cifar", "train", tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        find_idx_files("mnist", "val", tmp_path)


def test_bad_magic_truncation_and_swaps(tmp_path):
    arr = np.zeros((2, 4, 4), np.uint8)
    p = tmp_path / "f"
    p.write_bytes(b"<html>not found</html>")
    with pytest.raises(CorruptDatasetError, match="magic number .* HTML"):
        read_idx(p)
    p.write_bytes(idx_bytes(arr, magic=0x00000D03))  # float32 element type
    with pytest.raises(CorruptDatasetError, match="unsigned-byte"):
        read_idx(p)
    p.write_bytes(idx_bytes(arr)[:-5])
    with pytest.raises(CorruptDatasetError, match=r"shape \(2, 4, 4\) \(32 bytes.*has 27"):
        read_idx(p)
    p.write_bytes(idx_bytes(arr) + b"\0")
    with pytest.raises(CorruptDatasetError, match="truncated or damaged"):
        read_idx(p)
    p.write_bytes(struct.pack(">I", 0x00000803) + b"\0\0\0\2")
    with pytest.raises(CorruptDatasetError, match="header .* truncated"):
        read_idx(p)
    p.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(CorruptDatasetError, match="swapped"):
        read_idx(p, IMAGES_MAGIC)
    assert read_idx(p, LABELS_MAGIC).shape == (3,)
    p.write_bytes(gzip.compress(idx_bytes(arr))[:-10])
    with pytest.raises(CorruptDatasetError, match="gzip"):
        read_idx(p)


def test_count_mismatch_and_label_range(tmp_path):
    write_split(tmp_path, "train", 4, 0, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(CorruptDatasetError, match="4 images but .* 3 labels"):
        load_idx("mnist", "train", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(4, 12, np.uint8)))
    with pytest.raises(CorruptDatasetError, match="label 12 outside 0..9"):
        load_idx("mnist", "train", tmp_path)


def test_fit_trains_on_idx_data(tmp_path):
    from npbml.fit import ConfigError, build_fit_data, fit, fit_config_from_dict

    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 200), ("t10k", 60)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        # Learnable images: class c lights up row 2c (plus noise), so a model can beat chance.
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        images[np.arange(n), 2 * labels.astype(int)] = 255
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    cfg = fit_config_from_dict(
        {
            "data": {"kind": "idx", "name": "mnist", "root": str(tmp_path), "val_fraction": 0.1},
            "model": {"name": "mlp", "hidden": [32]},
            "optim": {"lr": 0.1},
            "loss": {"name": "ce"},
            "train": {"epochs": 5, "batch_size": 32, "seed": 0},
        }
    )
    data = build_fit_data(cfg)
    assert len(data.train[0]) == 180 and len(data.val[0]) == 20 and len(data.test[0]) == 60
    assert data.train[0].shape[1:] == (1, 28, 28) and data.num_outputs == 10
    assert fit(cfg, tmp_path / "run")["test_acc"] > 0.5  # chance is 0.1
    with pytest.raises(ConfigError, match="data.name .* goes with data.kind='idx'"):
        fit_config_from_dict({"data": {"kind": "idx"}})
    with pytest.raises(ConfigError, match="data.name .* goes with"):
        fit_config_from_dict({"data": {"name": "mnist"}})
