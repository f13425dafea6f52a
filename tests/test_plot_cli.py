"""``npbml plot`` and the run-curve plots of npbml.plots (issue 14)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from npbml import cli
from npbml.plots import run_curves


def _write_run(folder, steps=(10, 20, 30, 40), val_every=20, seconds_per_step=0.5):
    """A run folder whose metrics.jsonl looks like npbml train's: train records every 10 steps
    (with time_s), validation records every ``val_every``."""
    folder.mkdir(parents=True)
    lines = []
    for s in steps:
        lines.append(
            {
                "step": s,
                "split": "train",
                "loss": 2.0 / s,
                "accuracy": s / 50,
                "time_s": seconds_per_step * s,
            }
        )
        if s % val_every == 0:
            lines.append(
                {
                    "step": s,
                    "split": "validation",
                    "accuracy": 0.4 + s / 100,
                    "ci95": 0.01,
                    "tasks": 4,
                    "best": True,
                }
            )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_run_curves_by_step_and_by_time(tmp_path):
    run = _write_run(tmp_path / "a")
    c = run_curves(run)
    assert set(c) == {"train-loss", "train-accuracy", "validation"}
    np.testing.assert_allclose(c["validation"][0], [20, 40])
    np.testing.assert_allclose(c["validation"][1], [0.6, 0.8])
    np.testing.assert_allclose(c["train-loss"][1], [0.2, 0.1, 2 / 30, 0.05])
    t = run_curves(run / "metrics.jsonl", x="time")
    np.testing.assert_allclose(t["validation"][0], [10.0, 20.0])  # 0.5 s per step
    with pytest.raises(ValueError, match="'step' or 'time'"):
        run_curves(run, x="epoch")


def test_plot_writes_a_png_of_several_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = _write_run(tmp_path / "x" / "full")
    b = _write_run(tmp_path / "y" / "full", seconds_per_step=1.0)
    out = tmp_path / "curves.png"
    assert cli.main(["plot", str(a), str(b), "--out", str(out), "--x", "time"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # Same folder names: the parent disambiguates the legend labels.
    assert cli.plot._labels([str(a), str(b)], None) == ["x/full", "y/full"]


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    run = _write_run(tmp_path / "a")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "c.png"
    assert cli.main(["plot", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npbml: error: ") and "pip install 'npbml[plot]'" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_plot_bad_input_is_one_error_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _write_run(tmp_path / "a")
    assert cli.main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "c.png")]) == 2
    assert "no training records in" in capsys.readouterr().err
    argv = ["plot", str(run), "--labels", "one", "two", "--out", str(tmp_path / "c.png")]
    assert cli.main(argv) == 2
    assert "--labels has 2 names for 1 runs" in capsys.readouterr().err


def _fit_run(tmp_path):
    """A tiny finished ``npbml fit`` run (3 blobs, 2 epochs)."""
    from conftest import tiny_fit_config

    from npbml.fit import fit

    cfg = tiny_fit_config(tmp_path)
    fit(cfg, tmp_path / "fitrun")
    return tmp_path / "fitrun"


def test_a_fit_run_plots_its_curves(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _fit_run(tmp_path)
    c = run_curves(run)
    # 48 training rows, batches of 16: 3 steps per epoch, one train and validation point each.
    np.testing.assert_allclose(c["train-loss"][0], [3, 6])
    np.testing.assert_allclose(c["validation"][0], [3, 6])
    val = c["validation"][1]
    assert np.isfinite(c["train-loss"][1]).all() and (val >= 0).all() and (val <= 1).all()
    assert "train-accuracy" not in c  # fit logs no training accuracy
    assert run_curves(run, x="time")["validation"][0][-1] > 0
    out = tmp_path / "fit.png"
    assert cli.main(["plot", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_plot_with_nothing_to_draw_is_an_error(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _write_run(tmp_path / "a")
    out = tmp_path / "c.png"
    # A run whose records have no point in the chosen panel: an error, not empty axes.
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 1}) + "\n")
    assert cli.main(["plot", str(run), "--panels", "validation", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to plot" in err[0] and "train-loss" in err[0]
    assert not out.exists()


def test_plot_out_without_extension_reports_the_file_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _write_run(tmp_path / "a")
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "afile")]) == 0
    written = tmp_path / "afile.png"
    assert capsys.readouterr().out.strip() == f"wrote {written}"
    assert written.is_file() and not (tmp_path / "afile").exists()
