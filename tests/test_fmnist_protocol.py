"""scripts/fmnist_losses.py: the protocol on tiny IDX files (tuning, test read once, paired CIs)."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fmnist_losses.py"


@pytest.fixture(scope="module")
def fl():
    spec = importlib.util.spec_from_file_location("fmnist_losses", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_root(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_idx import idx_bytes

    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 400), ("t10k", 100)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        images[np.arange(n), 2 * labels.astype(int)] = 255  # learnable: class c lights row 2c
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return tmp_path


def test_paired_differences_and_student_t_interval(fl):
    res = {
        "ce": {"test": {"0": 0.80, "1": 0.82, "2": 0.81}},
        "x": {"test": {"0": 0.81, "1": 0.84, "2": 0.80}},
    }
    got = fl.paired(res, "x")
    d = [1.0, 2.0, -1.0]  # points, by hand
    half = 4.303 * statistics.stdev(d) / math.sqrt(3)
    assert got["mean"] == pytest.approx(statistics.mean(d))
    assert got["low"] == pytest.approx(statistics.mean(d) - half)
    assert got["high"] == pytest.approx(statistics.mean(d) + half)
    assert got["n"] == 3 and got["wins"] == 2
    assert fl.paired({"ce": {"test": {"0": 0.8}}, "x": {"test": {"0": 0.9}}}, "x") is None


def _count_reads(fl, monkeypatch) -> list[str]:
    """The splits the script loads, in order (``load_idx_float`` wrapped to record them)."""
    reads: list[str] = []
    original = fl.load_idx_float

    def counting(name, split, root=None):
        reads.append(split)
        return original(name, split, root)

    monkeypatch.setattr(fl, "load_idx_float", counting)
    return reads


def test_protocol_end_to_end_reads_the_test_split_once(fl, tiny_root, tmp_path, monkeypatch):
    reads = _count_reads(fl, monkeypatch)
    out = tmp_path / "out.json"
    args = ["--models", "logistic", "--losses", "ce", "sparse_lsr", "adalfl_guarded", "ml3"]
    args += ["--seeds", "0", "1", "--lrs", "0.01", "0.1", "--steps", "6", "--offline-steps", "2"]
    args += ["--val-size", "50", "--root", str(tiny_root), "--json", str(out)]
    fl.main(args)
    assert reads.count("test") == 1 and reads.count("train") == 1
    res = json.loads(out.read_text())["results"]["logistic"]
    for loss in ("ce", "sparse_lsr", "adalfl_guarded", "ml3"):
        entry = res[loss]
        assert set(entry["val_by_lr"]) == {"0.01", "0.1"} and set(entry["test"]) == {"0", "1"}
        assert entry["lr"] == float(max(entry["val_by_lr"], key=entry["val_by_lr"].get))
        assert all(0.0 <= v <= 1.0 for v in entry["test"].values())
    assert res["sparse_lsr"]["paired_vs_ce"]["n"] == 2
    table = fl.markdown(json.loads(out.read_text()))
    mean = 100 * statistics.mean(res["ml3"]["test"].values())
    assert "#### logistic" in table and f"| ml3 | {res['ml3']['lr']} (" in table
    assert f"{mean:.2f} +- " in table
    # Resuming with the same JSON re-runs nothing (every run is recorded).
    reads.clear()
    fl.main(args)
    assert reads == ["train", "test"] and json.loads(out.read_text())["results"]["logistic"] == res


def test_models_and_bad_names(fl):
    import torch

    for name, params in (("logistic", 7850), ("mlp", 269322), ("lenet5", 44426)):
        model = fl.make_model(name)
        assert sum(p.numel() for p in model.parameters()) == params
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        fl.make_model("resnet")
    with pytest.raises(ValueError, match="unknown loss"):
        fl.fixed_loss("hinge", fl.DEFAULT_EVOLVED)


def test_ml3_knee_diagnosis(fl, tiny_root, tmp_path):
    out = tmp_path / "knee.json"
    args = ["--knee", "0", "--knee-guard", "--knee-images", "256", "--knee-epochs", "2"]
    args += ["--offline-steps", "2", "--val-size", "50", "--root", str(tiny_root)]
    knee = fl.main([*args, "--json", str(out)])["knee"]
    assert len(knee) == 1 and knee[0]["guard"] and len(knee[0]["g1"]) == 11
    assert len(knee[0]["epochs"]) == 2
    # The guard's floor: the step is never below a quarter of cross-entropy's.
    assert all(e["grad_ratio"] >= 0.25 - 1e-6 for e in knee[0]["epochs"])
    assert json.loads(out.read_text())["knee"] == knee


def test_a_widened_grid_that_changes_the_lr_reruns_the_seeds(fl, tiny_root, tmp_path):
    out = tmp_path / "out.json"
    # A run recorded without its lr (older JSON) at lr 0.01, a validation score any lr beats.
    old = {"val_by_lr": {"0.01": -1.0}, "lr": 0.01, "test": {"0": 0.123456}, "runs": {"0": {}}}
    out.write_text(json.dumps({"results": {"logistic": {"ce": old}}}))
    args = ["--models", "logistic", "--losses", "ce", "--seeds", "0", "--steps", "3"]
    args += ["--val-size", "50", "--root", str(tiny_root), "--json", str(out)]
    fl.main([*args, "--lrs", "0.01"])  # same grid: the recorded run stands
    assert json.loads(out.read_text())["results"]["logistic"]["ce"]["test"] == {"0": 0.123456}
    fl.main([*args, "--lrs", "0.01", "0.5"])  # 0.5 is measured, wins, and seed 0 is retrained
    entry = json.loads(out.read_text())["results"]["logistic"]["ce"]
    assert entry["lr"] == 0.5 and entry["runs"]["0"]["lr"] == 0.5 and entry["test"]["0"] != 0.123456


def test_tune_only_and_evolved_rows(fl, tiny_root, tmp_path, monkeypatch):
    reads = _count_reads(fl, monkeypatch)
    out = tmp_path / "out.json"
    best = tmp_path / "best.json"  # what `npbml evolve` writes: expression and tuned scalars
    scalars = [3.0] + [1.0] * 5
    best.write_text(json.dumps({"expression": "mul(-1, mul(y, log(f)))", "scalars": scalars}))
    base = ["--models", "logistic", "--steps", "4", "--lrs", "0.1", "--val-size", "50"]
    base += ["--root", str(tiny_root), "--json", str(out)]
    fl.main([*base, "--losses", "evomal_x", "--evolved", str(best), "--seeds"])  # tune only
    assert reads == ["train"]  # the test split is not read when no seed is trained
    entry = json.loads(out.read_text())["results"]["logistic"]["evomal_x"]
    assert entry["evolved"] == str(best) and set(entry["val_by_lr"]) == {"0.1"}
    assert entry["test"] == {} and entry["lr"] == 0.1  # the choice is saved too
    # The row's formula is fixed: another one is refused, not mixed into its seeds.
    with pytest.raises(SystemExit, match="recorded with --evolved"):
        fl.main([*base, "--losses", "evomal_x", "--evolved", "mul(y, f)", "--seeds", "0"])
    # A best.json loss carries its scalars: the root's (the first, prefix order) scales it.
    import torch
    import torch.nn.functional as F

    z, t = torch.randn(6, 10), torch.arange(6)
    got = fl.fixed_loss("evomal_x", str(best))(z, t)
    assert got.item() == pytest.approx(3 * F.cross_entropy(z, t).item(), rel=1e-5)


def test_trajectory_reproduces_the_tuning_run(fl, tiny_root, tmp_path, monkeypatch):
    reads: list[str] = []
    original = fl.load_idx_float
    monkeypatch.setattr(
        fl, "load_idx_float", lambda n, s, r=None: reads.append(s) or original(n, s, r)
    )
    common = ["--models", "logistic", "--lrs", "0.001", "--steps", "6", "--val-size", "50"]
    common += ["--offline-steps", "2", "--root", str(tiny_root)]
    out = fl.main([*common, "--trajectory", "ce", "adalfl", "--trajectory-every", "3",
                   "--json", str(tmp_path / "t.json")])  # fmt: skip
    assert reads == ["train"]  # no test image is read
    ce, ada = out["trajectory"]["ce"]["points"], out["trajectory"]["adalfl"]["points"]
    assert [p["step"] for p in ce] == [3, 6] and [p["step"] for p in ada] == [3, 6]
    # Cross-entropy against itself: ratio 1, cosine 1.
    assert all(p["grad_ratio"] == pytest.approx(1) and p["cosine"] == pytest.approx(1) for p in ce)
    assert all(math.isfinite(p["grad_ratio"]) and -1 <= p["cosine"] <= 1 + 1e-6 for p in ada)
    # The trajectory is the tuning run itself: the same final validation accuracy.
    tuned = fl.main([*common, "--losses", "ce", "adalfl", "--seeds",
                     "--json", str(tmp_path / "r.json")])  # fmt: skip
    for loss, points in (("ce", ce), ("adalfl", ada)):
        assert tuned["results"]["logistic"][loss]["val_by_lr"]["0.001"] == points[-1]["val_acc"]
