"""``npbml demo`` on the bundled Omniglot minimal characters (issue 14): three methods, the same
test episodes, paired differences, a curves picture, and a progress bar of the time budget."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest

from npbml import cli
from npbml.cli import demo
from npbml.config import ConfigError

# Tiny budgets: a few steps of everything, few validation and test episodes.
FAST = ["--set", "train.val_tasks=2", "--set", "train.val_every=2", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny demo on real characters, its JSON result and output folder."""
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--minutes", "0.05", "--tasks", "5", "--out", str(out), "--json", *FAST]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(argv) == 0
    return json.loads(buf.getvalue()), out


def test_demo_trains_three_methods_on_bundled_omniglot(demo_run):
    res, out = demo_run
    methods = [r["method"] for r in res["results"]]
    assert methods == ["MAML", "NPBML", "Proto"]
    for r in res["results"]:
        assert r["config"]["data"]["name"] == "omniglot-minimal"
        assert r["config"]["data"]["root"] is None  # the bundled zips, no download
        assert r["tasks"] == 5 and len(r["accuracies"]) == 5
        assert 0.0 <= r["accuracy"] <= 1.0
    by = {r["method"]: r for r in res["results"]}
    assert by["MAML"]["meta_steps"] >= 1 and by["NPBML"]["meta_steps"] >= 1
    assert by["Proto"]["meta_steps"] == 0 and by["Proto"]["run_dir"] is None
    for r in res["results"]:  # a trained method that never validated is flagged, not reported
        if r["run_dir"] is not None and r["best_val_accuracy"] is None:
            assert "starting point" in r["warning"]
    # NPBML ran its pre-training and is tested from it; Proto uses that very backbone.
    npbml_opts = by["NPBML"]["config"]["algorithm"]["options"]
    assert (out / "npbml" / "backbone.pt").is_file()
    assert npbml_opts["backbone_checkpoint"] == str(out / "npbml" / "backbone.pt")
    assert by["NPBML"]["config"]["train"]["meta_lr"] == pytest.approx(1e-3)  # issue 12's recipe
    assert json.loads((out / "summary.json").read_text())["paired"] == res["paired"]


def test_demo_paired_differences_are_per_episode(demo_run):
    res, _ = demo_run
    by = {r["method"]: r["accuracies"] for r in res["results"]}
    pairs = {(p["a"], p["b"]): p for p in res["paired"]}
    assert set(pairs) == {("NPBML", "MAML"), ("NPBML", "Proto")}
    for (a, b), p in pairs.items():
        d = [x - y for x, y in zip(by[a], by[b])]
        assert p["n"] == 5 and p["mean"] == pytest.approx(sum(d) / 5)
        assert p["wins"] == sum(x > 0 for x in d) and p["losses"] == sum(x < 0 for x in d)


def test_demo_writes_the_validation_curves(demo_run):
    pytest.importorskip("matplotlib")
    res, out = demo_run
    assert res["curves"] == str(out / "curves.png")
    data = (out / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_demo_without_matplotlib_skips_the_picture(demo_run, monkeypatch, capsys):
    res, out = demo_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert demo._plot(res["results"], out / "none.png", sys.stdout) is None
    assert "npbml[plot]" in capsys.readouterr().out and not (out / "none.png").exists()


def test_budget_bar_counts_seconds_not_steps(capsys):
    bar = demo._BudgetBar("NPBML", 240.4, show=True)
    bar(7, [{"split": "train"}, {"split": "validation", "accuracy": 0.931}])
    text = str(bar.bar)
    bar.close()
    assert bar.bar.total == 240 and "/240 s" in text and "step 7, val 93.1%" in text
    assert "100000" not in text and "it/s" not in text
    assert "step 7: validation accuracy 93.10%" in capsys.readouterr().out


def test_pretraining_scales_with_the_budget():
    assert demo._scaled(500, demo.REFERENCE_MINUTES) == 500
    assert demo._scaled(500, 2 * demo.REFERENCE_MINUTES) == 500  # a ceiling, not a rate
    assert demo._scaled(500, demo.REFERENCE_MINUTES / 4) == 125
    assert demo._scaled(500, 0.01) == 5


def test_every_family_shares_its_test_episodes():
    for family, runs in demo.DEMO_FAMILIES.items():
        configs = [demo.demo_config(r) for r in runs]
        demo._check_same_episodes(runs, configs)  # does not raise
        assert {c.data.name for c in configs} == {
            "omniglot": {"omniglot-minimal"},
            "glyphs": {"glyphs"},
        }[family]
    runs = demo.OMNIGLOT_RUNS
    configs = [demo.demo_config(r, [f"train.seed={i}"]) for i, r in enumerate(runs)]
    with pytest.raises(ConfigError, match="other test episodes"):
        demo._check_same_episodes(runs, configs)


def test_missing_demo_config_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match="package data.*reinstall"):
        demo.demo_config(demo.OMNIGLOT_RUNS[0])


def test_stop_rule_reserves_testing_but_trains_to_the_first_validation(monkeypatch, capsys):
    """A share eaten by pre-training still meta-trains up to its first validation (scaled
    down for small budgets); with time left it stops only when testing would not fit."""
    import time

    monkeypatch.setattr(demo, "_seconds_per_test_task", lambda config, tasksets: 0.01)
    config = demo.demo_config(demo.OMNIGLOT_RUNS[1])  # NPBML, val_every 50
    now = time.perf_counter()
    _, late = demo._stop_rule(config, None, 600, now, demo.REFERENCE_MINUTES, sys.stdout)
    assert "training 50 steps anyway" in capsys.readouterr().out
    assert not late(0) and not late(49) and late(50)
    _, small = demo._stop_rule(config, None, 600, now, 0.05, sys.stdout)
    assert not small(4) and small(5)  # _scaled(50, 0.05) = 5
    measure, roomy = demo._stop_rule(config, None, 600, now + 60.0, 8.0, sys.stdout)
    assert not roomy(50)  # 600 x 0.01 s x 1.1 fits in the minute left
    measure(50, [{"split": "validation", "eval_s": 10.0, "tasks": 100}])  # now 0.1 s a task
    assert roomy(50)
    # A later, faster validation (cached episodes) does not lower the estimate again.
    measure(100, [{"split": "validation", "eval_s": 0.1, "tasks": 100}])
    assert roomy(100)
