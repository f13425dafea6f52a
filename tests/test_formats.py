"""Loaders of mini-ImageNet, tiered-ImageNet, CIFAR-FS, FC100 and image folders.

Fixtures are small datasets written in the exact on-disk formats (tests/fixtures_formats.py);
every test reads them back through the public loaders and compares with what was written.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_formats import (
    CIFAR_FS_CLASSES,
    write_cifar_fs,
    write_data_labels_pickles,
    write_image_folder,
    write_mini_imagenet,
    write_tiered_imagenet,
)
from PIL import Image

from tasks import CorruptDatasetError, DatasetNotFoundError, get_tasksets
from tasks.cifarfs import cifar_fs_splits
from tasks.fc100 import fc100_splits
from tasks.folder import ImageFolderClasses, folder_splits, split_classes
from tasks.miniimagenet import MiniImageNet, mini_imagenet_splits
from tasks.tieredimagenet import TieredImageNet, tiered_imagenet_splits

SPLITS = ("train", "validation", "test")


def assert_matches(ds, written: dict[str, np.ndarray]) -> None:
    """``ds`` has exactly the classes of ``written`` (by name) with the same images in order."""
    assert ds.num_classes == len(written)
    names = [ds.class_name(c) for c in range(ds.num_classes)]
    assert sorted(names) == sorted(written)
    for c, name in enumerate(names):
        expected = torch.from_numpy(written[name]).float() / 255.0
        got = ds.images(c, np.arange(ds.num_images(c)))
        assert got.dtype == torch.float32
        assert got.shape == expected.shape
        assert torch.equal(got, expected), f"images of class {name} differ"


# ----------------------------------------------------------------------------- mini-ImageNet


def test_mini_imagenet_reads_learn2learn_pickles(tmp_path: Path) -> None:
    written = write_mini_imagenet(tmp_path)
    splits = mini_imagenet_splits(tmp_path)
    assert set(splits) == set(SPLITS)
    for split in SPLITS:
        ds = splits[split]
        assert_matches(ds, written[split])
        names = [ds.class_name(c) for c in range(ds.num_classes)]
        assert names == sorted(names)  # classes are the wnids in sorted order
        # Stored compactly: one uint8 channels-first tensor, never a float copy of the set.
        assert ds.data.dtype == torch.uint8
        assert tuple(ds.data.shape) == (48, 3, 84, 84)
        assert ds.data.is_contiguous()
    # The splits' wnids are disjoint, as written.
    sets = [{splits[s].class_name(c) for c in range(6)} for s in SPLITS]
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2])


def test_mini_imagenet_val_name_subfolder_and_transform(tmp_path: Path) -> None:
    written = write_mini_imagenet(tmp_path / "mini-imagenet", val_name="val", classes=5)
    ds = MiniImageNet(tmp_path, "validation", transform=lambda x: 1.0 - x)
    assert ds.path.name == "mini-imagenet-cache-val.pkl"
    name = ds.class_name(2)
    expected = 1.0 - torch.from_numpy(written["validation"][name][:3]).float() / 255.0
    assert torch.equal(ds.images(2, [0, 1, 2]), expected)
    assert MiniImageNet(tmp_path, "val").num_classes == 5
    with pytest.raises(ValueError, match="split must be"):
        MiniImageNet(tmp_path, "dev")


def test_mini_imagenet_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as e:
        mini_imagenet_splits(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "mini-imagenet-cache-train.pkl") in msg
    assert "learn2learn" in msg
    write_mini_imagenet(tmp_path, classes=3, per_class=4)
    (tmp_path / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(DatasetNotFoundError, match="mini-imagenet-cache-test.pkl"):
        mini_imagenet_splits(tmp_path)
    # A truncated download.
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CorruptDatasetError, match="mini-imagenet-cache-train.pkl"):
        MiniImageNet(tmp_path, "train")
    # A pickle of the wrong shape of content.
    with open(path, "wb") as f:
        pickle.dump({"images": np.zeros((2, 84, 84, 3), np.uint8)}, f)
    with pytest.raises(CorruptDatasetError, match="image_data"):
        MiniImageNet(tmp_path, "train")
    with open(path, "wb") as f:
        pickle.dump({"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"a": [5]}}, f)
    with pytest.raises(CorruptDatasetError, match="rows outside"):
        MiniImageNet(tmp_path, "train")


def test_mini_imagenet_through_get_tasksets(tmp_path: Path) -> None:
    write_mini_imagenet(tmp_path)
    tasks = get_tasksets("mini-imagenet", str(tmp_path), ways=5, shots=1, queries=3, seed=3)
    ep = tasks.train.sample()
    assert ep.support_x.shape == (5, 3, 84, 84) and ep.query_x.shape == (15, 3, 84, 84)
    assert float(ep.support_x.min()) >= 0.0 and float(ep.support_x.max()) <= 1.0
    ep_test = tasks.test.sample()
    assert ep_test.query_y.tolist() == np.repeat(np.arange(5), 3).tolist()


# ---------------------------------------------------------------------------- tiered-ImageNet


@pytest.mark.parametrize("as_array", [False, True])
def test_tiered_imagenet_reads_png_pickles(tmp_path: Path, as_array: bool) -> None:
    written = write_tiered_imagenet(tmp_path / "tiered-imagenet", as_array=as_array, size=24)
    splits = tiered_imagenet_splits(tmp_path)
    for split in SPLITS:
        assert_matches(splits[split], written[split])
    # Names come from label_specific_str, in label order.
    assert splits["test"].class_name(4) == "class_test_4"


def test_tiered_imagenet_decodes_lazily_and_validation_alias(tmp_path: Path) -> None:
    write_tiered_imagenet(tmp_path, val_prefix="validation", size=16)
    pngs = pickle.loads((tmp_path / "train_images_png.pkl").read_bytes())
    labels = pickle.loads((tmp_path / "train_labels.pkl").read_bytes())["label_specific"]
    bad_row = int(np.flatnonzero(labels == 2)[0])
    pngs[bad_row] = pngs[bad_row][:40]  # truncated PNG: only that image is unreadable
    (tmp_path / "train_images_png.pkl").write_bytes(pickle.dumps(pngs))
    ds = TieredImageNet(tmp_path, "train")  # no decoding at construction
    assert isinstance(ds.png[0], bytes)
    assert ds.images(0, np.arange(8)).shape == (8, 3, 16, 16)
    with pytest.raises(CorruptDatasetError, match=f"image {bad_row} of .*train_images_png.pkl"):
        ds.class_images(2)
    assert TieredImageNet(tmp_path, "val").num_classes == 6


def test_tiered_imagenet_missing_and_mismatched(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="train_images_png.pkl"):
        tiered_imagenet_splits(tmp_path)
    write_tiered_imagenet(tmp_path, classes=3, per_class=4, size=8)
    (tmp_path / "test_labels.pkl").unlink()
    with pytest.raises(DatasetNotFoundError, match="test_labels.pkl"):
        tiered_imagenet_splits(tmp_path)
    (tmp_path / "train_images_png.pkl").write_bytes(pickle.dumps([b"x"] * 5))
    with pytest.raises(CorruptDatasetError, match="5 images .* 12 labels"):
        TieredImageNet(tmp_path, "train")


# ---------------------------------------------------------------------------------- CIFAR-FS


@pytest.mark.parametrize("where", ["root", "cifarfs", "cifar100-as-root"])
def test_cifar_fs_bertinetto_layout(tmp_path: Path, where: str) -> None:
    base = tmp_path / "cifarfs" if where == "cifarfs" else tmp_path
    written = write_cifar_fs(base)
    root = tmp_path / "cifar100" if where == "cifar100-as-root" else tmp_path
    splits = cifar_fs_splits(root)
    for split in SPLITS:
        ds = splits[split]
        # Class order is the split file's order.
        assert [ds.class_name(c) for c in range(ds.num_classes)] == CIFAR_FS_CLASSES[split]
        assert_matches(ds, written[split])


def test_cifar_fs_processed_and_pickle_layouts(tmp_path: Path) -> None:
    written = write_cifar_fs(tmp_path / "src")
    for split, short in (("train", "train"), ("validation", "val"), ("test", "test")):
        for name in CIFAR_FS_CLASSES[split]:
            shutil.copytree(
                tmp_path / "src/cifar100/data" / name,
                tmp_path / "l2l/cifarfs/processed" / short / name,
            )
    splits = cifar_fs_splits(tmp_path / "l2l")
    for split in SPLITS:
        assert_matches(splits[split], written[split])
    pickled = write_data_labels_pickles(tmp_path / "mo" / "CIFAR-FS", prefix="CIFAR_FS")
    splits = cifar_fs_splits(tmp_path / "mo")
    for split in SPLITS:
        assert_matches(splits[split], pickled[split])


def test_cifar_fs_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="splits/bertinetto"):
        cifar_fs_splits(tmp_path)
    write_cifar_fs(tmp_path, per_class=2)
    split_file = tmp_path / "cifar100/splits/bertinetto/test.txt"
    split_file.write_text(split_file.read_text() + "not_a_class\n")
    with pytest.raises(DatasetNotFoundError, match="not_a_class"):
        cifar_fs_splits(tmp_path)


# ------------------------------------------------------------------------------------- FC100


def test_fc100_reads_python2_pickles(tmp_path: Path) -> None:
    written = write_data_labels_pickles(tmp_path / "FC100")
    # The fixture is a genuine Python 2 style pickle: the default ASCII decoding rejects it.
    with pytest.raises(UnicodeDecodeError):
        pickle.loads((tmp_path / "FC100/FC100_train.pickle").read_bytes())
    splits = fc100_splits(tmp_path)
    for split in SPLITS:
        assert_matches(splits[split], written[split])
        assert splits[split].data.dtype == torch.uint8
    assert [splits["validation"].class_name(c) for c in range(6)] == [str(10 + k) for k in range(6)]
    tasks = get_tasksets("fc100", str(tmp_path), ways=3, shots=2, queries=2)
    assert tasks.validation.sample().support_x.shape == (6, 3, 32, 32)


def test_fc100_missing_and_truncated(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="FC100_train.pickle"):
        fc100_splits(tmp_path)
    write_data_labels_pickles(tmp_path, classes=2, per_class=3)
    path = tmp_path / "FC100_val.pickle"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptDatasetError, match="FC100_val.pickle"):
        fc100_splits(tmp_path)


# ------------------------------------------------------------------------------ image folders


def test_image_folder_formats_hidden_files_and_cache(tmp_path: Path) -> None:
    exact = {}
    exact.update(write_image_folder(tmp_path, ["a_png"], 3, 12, "png", seed=1))
    exact.update(write_image_folder(tmp_path, ["b_bmp"], 3, 12, "bmp", seed=2))
    write_image_folder(tmp_path, ["c_jpg"], 3, 12, "jpg", seed=3)
    write_image_folder(tmp_path, ["d_gif"], 3, 12, "gif", seed=4)
    (tmp_path / "a_png" / ".DS_Store").write_bytes(b"\x00junk")
    (tmp_path / "a_png" / "._000.png").write_bytes(b"resource fork")
    (tmp_path / "a_png" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden_class").mkdir()
    ds = ImageFolderClasses(tmp_path, cache=True)
    assert [ds.class_name(c) for c in range(ds.num_classes)] == ["a_png", "b_bmp", "c_jpg", "d_gif"]
    assert ds.class_sizes().tolist() == [3, 3, 3, 3]
    for c in (0, 1):  # lossless formats round-trip exactly
        expected = torch.from_numpy(exact[ds.class_name(c)]).float() / 255.0
        assert torch.equal(ds.class_images(c), expected)
    for c in (2, 3):
        x = ds.class_images(c)
        assert x.shape == (3, 3, 12, 12) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # Cached images are served without touching the files again.
    shutil.rmtree(tmp_path / "a_png")
    assert ds.images(0, [2]).shape == (1, 3, 12, 12)


def test_image_folder_resize_channels_and_lazy_errors(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["x", "y"], 4, 20, "png")
    Image.fromarray(np.zeros((30, 10, 3), np.uint8)).save(tmp_path / "y" / "999.png")
    ds = ImageFolderClasses(tmp_path, image_size=(8, 6), channels=1)
    assert ds.images(1, [0, 4]).shape == (2, 1, 8, 6)
    ds = ImageFolderClasses(tmp_path)  # sizes differ and no image_size: error names the fix
    with pytest.raises(CorruptDatasetError, match=r"999.png.*image_size"):
        ds.class_images(1)
    (tmp_path / "x" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = ImageFolderClasses(tmp_path, image_size=20)
    assert ds.images(0, [0, 1]).shape == (2, 3, 20, 20)  # lazy: the bad file is not read yet
    with pytest.raises(CorruptDatasetError, match=r"002.png.*delete or replace"):
        ds.images(0, [2])


def test_image_folder_empty_class_and_missing_root(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["full"], 2, 8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".gitkeep").write_text("")
    with pytest.raises(CorruptDatasetError, match=r"empty.*no images"):
        ImageFolderClasses(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageFolderClasses(tmp_path / "nope")
    with pytest.raises(DatasetNotFoundError, match="no class subfolders"):
        folder_splits(tmp_path / "full")


@pytest.mark.parametrize("val_dir", ["val", "validation"])
def test_folder_splits_from_split_subfolders(tmp_path: Path, val_dir: str) -> None:
    written = {
        "train": write_image_folder(tmp_path / "train", ["t0", "t1", "t2"], 5, 10, seed=0),
        "validation": write_image_folder(tmp_path / val_dir, ["v0", "v1"], 5, 10, seed=1),
        "test": write_image_folder(tmp_path / "test", ["s0", "s1", "s2", "s3"], 5, 10, seed=2),
    }
    splits = folder_splits(tmp_path)
    for split in SPLITS:
        assert_matches(splits[split], written[split])
    tasks = get_tasksets("folder", str(tmp_path), ways=2, shots=2, queries=3)
    assert tasks.test.sample().query_x.shape == (6, 3, 10, 10)


def test_folder_splits_seeded_class_split(tmp_path: Path) -> None:
    names = [f"class{k:02d}" for k in range(10)]
    write_image_folder(tmp_path, names, 2, 8)
    a = folder_splits(tmp_path, split_seed=5)
    b = folder_splits(tmp_path, split_seed=5)
    got = {s: [a[s].class_name(c) for c in range(a[s].num_classes)] for s in SPLITS}
    assert got == {s: [b[s].class_name(c) for c in range(b[s].num_classes)] for s in SPLITS}
    assert [len(got[s]) for s in SPLITS] == [6, 2, 2]  # round(0.64 * 10), round(0.16 * 10), rest
    assert sorted(got["train"] + got["validation"] + got["test"]) == names
    # The split is a function of the seed alone: it matches split_classes, and seeds differ.
    assert got == split_classes(names, (0.64, 0.16, 0.20), 5)
    others = [split_classes(names, (0.64, 0.16, 0.20), s)["train"] for s in range(6, 12)]
    assert any(o != got["train"] for o in others)
    with pytest.raises(CorruptDatasetError, match="at least 3 class folders"):
        split_classes(["a", "b"], (0.6, 0.2, 0.2), 0)


@pytest.mark.parametrize(
    "name", ["mini-imagenet", "tiered-imagenet", "cifar-fs", "fc100", "folder"]
)
def test_registered_loaders_need_a_root(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="root"):
        get_tasksets(name, None)
    # An empty folder: the error names what was expected there.
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
        get_tasksets(name, str(tmp_path), download=True)
