"""``npbml fit`` on bad input (issue item 6): each case stops before training with one
``npbml: error:`` line naming the problem and the fix; a non-finite step is skipped or stops the
run, never a quiet NaN run."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import yaml

from npbml import cli
from npbml.config import ConfigError, config_from_dict, fit_config_from_dict
from npbml.fit import fit


def _blobs(n: int = 90, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    centres = g.normal(size=(classes, 4)) * 3
    y = np.arange(n) % classes
    return (centres[y] + g.normal(size=(n, 4)) * 0.3).astype(np.float32), y


def _config(tmp_path, x, y, **sections) -> str:
    """An arrays file of ``x``/``y`` and a tiny fit config naming it; returns the config path."""
    npz = tmp_path / "data.npz"
    np.savez(npz, x=x, y=y)
    cfg = {
        "data": {"kind": "arrays", "path": str(npz)},
        "model": {"name": "mlp", "hidden": [8]},
        "optim": {"lr": 0.05},
        "loss": {"name": "ce"},
        "train": {"epochs": 1, "batch_size": 16, "progress": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _load(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _fit_error(capsys, config: str, out) -> str:
    """Run ``npbml fit``; assert it failed before training; return its one error line."""
    code = cli.main(["fit", "--config", config, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("npbml: error: "), err
    assert not (out / "last.pt").exists() if out.is_dir() else True
    return err[0]


@pytest.mark.parametrize(
    "labels, found",
    [
        (np.arange(90) % 10 + 1, "10 distinct values 1..10 (C=10)"),
        (np.r_[np.arange(80) % 9, np.full(10, 100)], "10 distinct values 0..100 (C=10)"),
        (np.arange(90) % 10 - 1, "10 distinct values -1..8 (C=10)"),
    ],
    ids=["one-based", "gap", "negative"],
)
def test_labels_that_are_not_0_to_c_minus_1_are_refused(tmp_path, capsys, labels, found):
    x, _ = _blobs()
    msg = _fit_error(capsys, _config(tmp_path, x, labels), tmp_path / "run")
    assert "labels must be integers 0..C-1" in msg and found in msg
    assert "np.unique(y, return_inverse=True)" in msg


def test_one_class_is_refused(tmp_path, capsys):
    x, _ = _blobs()
    msg = _fit_error(capsys, _config(tmp_path, x, np.zeros(90, dtype=int)), tmp_path / "run")
    assert "1 distinct value" in msg and "at least 2 classes" in msg


@pytest.mark.parametrize(
    "labels, words",
    [
        (np.arange(90) % 3 + 0.5, ["not integers", "data.task=regression"]),
        (np.array(["a", "b", "c"] * 30), ["strings", "np.unique(y, return_inverse=True)"]),
    ],
    ids=["fractional-floats", "strings"],
)
def test_float_and_string_labels_are_refused(tmp_path, capsys, labels, words):
    x, _ = _blobs()
    msg = _fit_error(capsys, _config(tmp_path, x, labels), tmp_path / "run")
    for w in words:
        assert w in msg, msg


def test_integral_float_labels_are_accepted(tmp_path):
    x, y = _blobs()
    cfg = _load(_config(tmp_path, x, y * 1.0))
    assert fit(fit_config_from_dict(cfg), tmp_path / "run")["test_acc"] > 0.5


def test_row_mismatch_is_refused(tmp_path, capsys):
    x, y = _blobs()
    msg = _fit_error(capsys, _config(tmp_path, x, y[:-5]), tmp_path / "run")
    assert "90 rows" in msg and "85" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_x_is_refused(tmp_path, capsys, bad):
    x, y = _blobs()
    x[7, 2] = bad
    msg = _fit_error(capsys, _config(tmp_path, x, y), tmp_path / "run")
    assert "non-finite" in msg and "row 7" in msg and "impute" in msg


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("optim", "lr", -0.1),
        ("optim", "lr", 0.0),
        ("optim", "momentum", -1.0),
        ("data", "val_fraction", 1.5),
        ("loss", "smoothing", 1.0),
    ],
)
def test_out_of_range_settings_are_refused(tmp_path, capsys, section, key, value):
    x, y = _blobs()
    msg = _fit_error(capsys, _config(tmp_path, x, y, **{section: {key: value}}), tmp_path / "run")
    assert f"{section}.{key}" in msg


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    x, y = _blobs()
    out = tmp_path / "afile"
    out.write_text("keep me")
    msg = _fit_error(capsys, _config(tmp_path, x, y), out)
    assert "--out" in msg and "not a directory" in msg
    assert out.read_text() == "keep me"


def test_train_refuses_one_way_tasks():
    from tiny_run import tiny_run

    cfg = tiny_run({"meta_steps": 1})
    cfg["data"]["ways"] = 1
    with pytest.raises(ConfigError, match="data.ways must be >= 2"):
        config_from_dict(cfg)


def _nan_after(monkeypatch, bad_steps: set[int]) -> None:
    """Put a NaN into the training batch of the given global steps (0-based)."""
    import npbml.fit as fit_mod

    real = fit_mod._TrainBatches.__call__

    def batch(self, step):
        x, y = real(self, step)
        if step in bad_steps:
            x = x.clone()
            x[0, 0] = float("nan")
        return x, y

    monkeypatch.setattr(fit_mod._TrainBatches, "__call__", batch)


@pytest.mark.parametrize("loss", ["ce", "sparse_lsr"])
def test_a_non_finite_step_is_skipped_with_a_warning_and_logged(tmp_path, monkeypatch, loss):
    x, y = _blobs()
    cfg = _load(_config(tmp_path, x, y, loss={"name": loss}))
    _nan_after(monkeypatch, {2})
    with pytest.warns(RuntimeWarning, match="non-finite"):
        final = fit(cfg, tmp_path / "run")
    assert final["test_acc"] > 0.5  # the NaN batch did not poison the model
    records = [json.loads(s) for s in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("skipped") == "nonfinite"]
    assert [r["step"] for r in skipped] == [3]  # the step that was dropped (1-based, as train)
    train = [r for r in records if r["split"] == "train" and "loss" in r]
    assert train and all(np.isfinite(r["loss"]) for r in train)
    assert (tmp_path / "run/best.pt").exists()


def test_too_many_non_finite_steps_stop_the_run_with_an_error(tmp_path, monkeypatch, capsys):
    x, y = _blobs()
    config = _config(tmp_path, x, y, train={"max_nonfinite_steps": 3})
    _nan_after(monkeypatch, set(range(100)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        msg = _fit_error(capsys, config, tmp_path / "run")
    assert "3 steps in a row" in msg and "non-finite" in msg
