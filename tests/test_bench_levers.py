"""scripts/bench_levers.py runs and reports both arms (a smoke test; the timings are not judged)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("lever", ["unfold", "warp", "norm"])
def test_bench_levers_reports_both_arms_and_maml(lever, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_levers

    out = tmp_path / "ab.json"
    assert (
        bench_levers.main(
            [
                "--lever",
                lever,
                "--setting",
                "demo",
                "--on",
                "10",
                "--rounds",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    arms = result["settings"]["demo"]
    assert set(arms) == {"test_off", "test_on", "test_maml", "step_off", "step_on", "step_maml"}
    assert all(v > 0 for v in arms.values())
    assert result["lever"] == lever and "bench_levers" in sys.modules


def test_bench_ab_runs_two_checkouts_interleaved(tmp_path, monkeypatch):
    # the checkout A/B'd against itself: both arms are timed and the ratios are reported
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_ab

    import npbml.models

    before = npbml.models.Conv4
    repo = SCRIPTS.parent
    out = tmp_path / "ab.json"
    args = [str(repo), str(repo), "--setting", "demo", "--rounds", "1", "--out", str(out)]
    assert bench_ab.main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["ms"]) == {"before:npbml", "before:maml", "after:npbml", "after:maml"}
    assert all(v > 0 for v in result["ms"].values())
    assert result["npbml_after_over_before"] > 0 and set(result["npbml_over_maml"]) == {
        "before",
        "after",
    }
    # one round: each paired ratio is that round's ratio of the two arms' times
    ms, paired = result["ms"], result["paired"]
    assert paired["npbml_after_over_before"] == pytest.approx(
        ms["after:npbml"] / ms["before:npbml"]
    )
    assert paired["npbml_over_maml:after"] == pytest.approx(ms["after:npbml"] / ms["after:maml"])
    assert result["variant"] == "npbml-frel"
    assert sys.modules["npbml.models"].Conv4 is before  # the test process's modules restored


def test_paired_ratio_is_the_median_of_per_round_ratios(monkeypatch):
    # a drift that doubles both arms in the last two rounds: every round's ratio is 1.5
    monkeypatch.syspath_prepend(str(SCRIPTS))
    from _report import paired_ratio

    a, b = [3.0, 3.0, 3.0, 6.0, 6.0], [2.0, 2.0, 2.0, 4.0, 4.0]
    assert paired_ratio(a, b) == 1.5
    a, b = [1.0, 4.0, 9.0], [2.0, 2.0, 3.0]  # ratios 0.5, 2, 3: median 2; medians' ratio 2
    assert paired_ratio(a, b) == 2.0
    a, b = [1.0, 10.0, 3.0], [1.0, 2.0, 6.0]  # ratios 1, 5, 0.5: median 1; medians 3 / 2 = 1.5
    assert paired_ratio(a, b) == 1.0
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0], [1.0, 2.0])
