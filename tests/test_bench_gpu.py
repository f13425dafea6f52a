"""``scripts/bench_gpu.py``, the GPU benchmark a session with a lent device runs in one call
(issue 13): on CPU at a tiny size, every variant of both backbones must run, the ratios must be
the medians' quotients, and a variant that raises must be recorded without losing the others."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
TINY = ["--device", "cpu", "--image-size", "16", "--steps", "1", "--warmup", "0"]
TINY += ["--meta-batch", "2", "--test-group", "2", "--cpu-threads", "1"]
TINY += ["--resnet12-channels", "8", "8", "16", "16"]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    yield importlib.import_module("bench_gpu")
    sys.path.remove(str(SCRIPT.parent))


def test_every_variant_runs_and_ratios_are_the_quotients(bench, tmp_path):
    out, md = tmp_path / "g.json", tmp_path / "bench.md"
    md.write_text("# Benchmarks\n\nkept\n")
    assert bench.main([*TINY, "--out", str(out), "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    assert list(result["devices"]) == ["cpu"]  # no CPU comparison rows when the device is the CPU
    for model in ("conv4", "resnet12"):
        res = result["devices"]["cpu"][model]
        assert set(res) == set(bench.VARIANTS)
        for v, r in res.items():
            assert "error" not in r, (model, v, r.get("traceback"))
            assert r["meta_step"]["s"] > 0 and r["test_time"]["s"] > 0
            assert "peak_mib" not in r["meta_step"]  # CUDA's allocator only
        for v in bench.VARIANTS[1:]:
            want = res[v]["meta_step"]["s"] / res["maml"]["meta_step"]["s"]
            assert res[v]["ratio"]["meta_step"] == pytest.approx(want)
        assert set(res["npbml"]["phases"]) == {"episode_work", "inner_forward"}
        assert "phases" not in res["npbml-pertask"]
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and text.count(bench.MD_START) == 1
    assert "| cpu | resnet12 | npbml-frel |" in text


def test_a_failing_variant_is_recorded_and_the_rest_still_run(bench, tmp_path, monkeypatch):
    real = bench.build

    def build(variant, *a):
        if variant == "npbml-pertask":
            raise RuntimeError("simulated device failure")
        return real(variant, *a)

    monkeypatch.setattr(bench, "build", build)
    out = tmp_path / "g.json"
    assert bench.main([*TINY, "--models", "conv4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["devices"]["cpu"]["conv4"]
    assert res["npbml-pertask"]["error"] == "RuntimeError: simulated device failure"
    assert "ratio" not in res["npbml-pertask"]
    assert res["npbml"]["ratio"]["test_time"] > 0


def test_bad_arguments_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--image-size", "8"])
