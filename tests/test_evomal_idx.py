"""EvoMAL fitness data from IDX files (``data.source: idx``), on small IDX files the tests write."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tasks.idx
from npbml.config import ConfigError
from npbml.evomal import EvolveConfig, EvoMALSearch, idx_data
from npbml.evomal.search import load_fitness_data

sys.path.insert(0, str(Path(__file__).parent))
from test_idx import idx_bytes  # noqa: E402  (the IDX writer the loader tests share)

CE = "mul(-1, mul(y, log(f)))"


def write_train_split(root: Path, per_class: int = 20, classes: int = 10) -> None:
    """KMNIST-layout *training* files only (no test split): class c lights rows 2c and 2c+1."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes, dtype=np.uint8), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(len(labels), 28, 28)).astype(np.uint8)
    rows = 2 * labels.astype(int)
    images[np.arange(len(labels)), rows] = 255
    images[np.arange(len(labels)), rows + 1] = 255
    raw = root / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))


def idx_config(root: Path, **data: object) -> EvolveConfig:
    base = {
        "source": "idx",
        "name": "kmnist",
        "root": str(root),
        "num_classes": 10,
        "train_per_class": 12,
        "val_per_class": 8,
    }
    return EvolveConfig.from_dict({"data": {**base, **data}})


def test_config_validates_the_idx_source(tmp_path):
    assert idx_config(tmp_path).data.name == "kmnist"
    with pytest.raises(ConfigError, match="needs data.name.*fashion-mnist"):
        EvolveConfig.from_dict({"data": {"source": "idx"}})
    with pytest.raises(ConfigError, match="unknown IDX dataset 'cifar'"):
        idx_config(tmp_path, name="cifar")
    with pytest.raises(ConfigError, match="num_classes=11 but kmnist has 10"):
        idx_config(tmp_path, num_classes=11)
    with pytest.raises(ConfigError, match="data.source must be one of gaussian, taskset, idx"):
        EvolveConfig.from_dict({"data": {"source": "files"}})
    with pytest.raises(ValueError, match="valid keys.*name"):
        EvolveConfig.from_dict({"data": {"source": "idx", "nmae": "kmnist"}})


def test_idx_data_reads_only_the_training_split(tmp_path, monkeypatch):
    write_train_split(tmp_path)
    splits: list[str] = []
    real = tasks.idx.find_idx_files

    def spy(name, split="train", root=None):
        splits.append(split)
        return real(name, split, root)

    monkeypatch.setattr(tasks.idx, "find_idx_files", spy)
    d = load_fitness_data(idx_config(tmp_path).data, seed=3)
    assert splits == ["train"]  # the test split (not even written here) is never looked up
    assert d.x_train.shape == (120, 1, 28, 28) and d.x_val.shape == (80, 1, 28, 28)
    assert d.num_classes == 10 and d.in_dim == 784
    assert torch.bincount(d.y_train).tolist() == [12] * 10
    assert torch.bincount(d.y_val).tolist() == [8] * 10
    # Standardised with the fitness-training images' statistics.
    assert abs(d.x_train.mean().item()) < 1e-4 and abs(d.x_train.std().item() - 1) < 1e-4
    # Every image is one of its class (class c lights rows 2c, 2c+1), and the training and
    # validation images are distinct ones.
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val)):
        bright = x[:, 0].mean(-1).argmax(-1)  # the brightest row
        assert torch.equal(bright // 2, y)
    keys_t = {tuple(r) for r in d.x_train.flatten(1)[:, :60].tolist()}
    keys_v = {tuple(r) for r in d.x_val.flatten(1)[:, :60].tolist()}
    assert len(keys_t) == 120 and len(keys_v) == 80 and not keys_t & keys_v
    # Seeded: the same seed gives the same draw, another seed another one.
    assert torch.equal(load_fitness_data(idx_config(tmp_path).data, seed=3).x_val, d.x_val)
    assert not torch.equal(load_fitness_data(idx_config(tmp_path).data, seed=4).x_val, d.x_val)


def test_idx_data_errors(tmp_path):
    write_train_split(tmp_path, per_class=20)
    with pytest.raises(ConfigError, match="class 0 has 20 training images but .* = 25"):
        load_fitness_data(idx_config(tmp_path, train_per_class=20, val_per_class=5).data, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="kmnist train"):
        idx_data("kmnist", 10, 5, 5, root=empty)


def test_search_trains_on_idx_data(tmp_path):
    """Cross-entropy, planted in generation 0, must reach a low validation error on the planted
    rows; a loss that ignores the labels (``f`` alone) must be rejected or do far worse."""
    write_train_split(tmp_path)
    cfg = EvolveConfig.from_dict(
        {
            "data": idx_config(tmp_path).to_dict()["data"],
            "model": {"hidden": [16]},
            "search": {"population": 2, "generations": 0, "initial_expressions": [CE, "mul(y, f)"]},
            "tuning": {"meta_steps": 2},
            "fitness": {"train_steps": 60, "lr": 0.1, "batch_size": 32},
        }
    )
    search = EvoMALSearch(cfg, tmp_path / "out", log=None)
    res = search.run()
    ce = search.evaluator.cache[search.evaluator.key(search.population[0])]
    assert ce.status == "ok" and ce.fitness < 0.3  # chance is 0.9
    assert res.best is not None and res.best.fitness == ce.fitness
    other = search.evaluator.cache[search.evaluator.key(search.population[1])]
    assert other.status != "ok" or other.fitness > ce.fitness
    assert (tmp_path / "out" / "best.json").is_file() and math.isfinite(res.best.fitness)
