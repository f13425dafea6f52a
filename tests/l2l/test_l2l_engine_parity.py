"""The benchmark's premise, tested: on learn2learn's own OmniglotCNN (a submodule registered
under two names, BatchNorm tracking running statistics), learn2learn 0.2.0's MAML
(clone/adapt/backward per task) and this engine give the same meta-gradient, second and first
order, sequential and task-parallel (scripts/bench_step.py --against learn2learn)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_step.py"


@pytest.fixture(scope="module")
def bench():
    # Imported by module name, with scripts/ left on sys.path: the 2-process variant's spawned
    # helper rank imports the script by that name too.
    sys.path.insert(0, str(SCRIPT.parent))
    yield importlib.import_module("bench_step")
    sys.path.remove(str(SCRIPT.parent))


@pytest.mark.parametrize("order", ["", "-fo"])
def test_engine_meta_gradient_equals_learn2learn(bench, order):
    torch.set_num_threads(1)
    args = argparse.Namespace(ways=5, shots=1, queries=3, meta_batch=3, workers=2)
    batch = bench.make_batch(args, torch.device("cpu"))
    ref = bench.L2LRunner(f"l2l{order}@1t", args, batch).grads()
    for variant in (f"engine{order}@1t", f"engine-parallel{order}"):
        ours = bench.L2LRunner(variant, args, batch)
        # Same seed, same weights: the engine ran on a model equal to learn2learn's.
        got = ours.grads()
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # The model's own Parameters are still in place after the run (no leaked fast weights).
        assert all(isinstance(p, torch.nn.Parameter) for p in ours.model.parameters())
        assert ours.model.features[1] is ours.model.base


def test_first_and_second_order_differ(bench):
    """Guards the comparison above against a learner that ignores first_order."""
    args = argparse.Namespace(ways=5, shots=1, queries=3, meta_batch=2, workers=2)
    batch = bench.make_batch(args, torch.device("cpu"))
    so = bench.L2LRunner("engine@1t", args, batch).grads()
    fo = bench.L2LRunner("engine-fo@1t", args, batch).grads()
    assert any(not torch.allclose(a, b) for a, b in zip(so, fo))


def _float64(batch):
    import dataclasses

    return dataclasses.replace(
        batch, support_x=batch.support_x.double(), query_x=batch.query_x.double()
    )


@pytest.mark.parametrize("order", ["", "-fo"])
def test_channels_last_engine_equals_learn2learn_in_float64(bench, order):
    """The channels-last variants (npbml.layout) compute learn2learn's meta-gradient: equal to
    rounding in float64 (in float32 the NHWC BatchNorm kernel rounds differently)."""
    torch.set_num_threads(1)
    args = argparse.Namespace(ways=5, shots=1, queries=3, meta_batch=3, workers=2)
    batch = _float64(bench.make_batch(args, torch.device("cpu")))
    ref_runner = bench.L2LRunner(f"l2l{order}@1t", args, batch)
    ref_runner.model.double()
    ref = ref_runner.grads()
    for variant in (f"engine-cl{order}@1t", f"engine-parallel-cl{order}"):
        ours = bench.L2LRunner(variant, args, batch)
        ours.model.double()
        assert ours.learner.channels_last
        for a, b in zip(ours.grads(), ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_two_process_variant_all_reduces_learn2learn_meta_gradient(bench):
    """engine-ddp-cl (a helper rank, gloo all-reduce of the two half meta-batches) gives
    learn2learn's meta-gradient on the whole meta-batch (float32, channels-last rounding)."""
    torch.set_num_threads(1)
    args = argparse.Namespace(
        ways=5, shots=1, queries=3, meta_batch=4, workers=2, steps=1, warmup=0, mem_steps=1
    )
    batch = bench.make_batch(args, torch.device("cpu"))
    ref = bench.L2LRunner("l2l@1t", args, batch).grads()
    ours = bench.L2LRunner("engine-ddp-cl", args, batch)
    try:
        got = ours.grads()
    finally:
        helpers = ours.close()
    scale = max(float(g.abs().max()) for g in ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * scale)
    assert len(helpers["helper_above_idle_mib"]) == 1


def test_malloc_setting_reaches_every_child_and_defaults_strip_the_shell(bench, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
    default = bench._malloc_env("default")
    assert not any(k.startswith("MALLOC_") for k in default)
    tuned = bench._malloc_env("tuned")
    assert {k: tuned[k] for k in bench.MALLOC_TUNED} == bench.MALLOC_TUNED
    assert "MALLOC_ARENA_MAX" not in tuned


def test_tiny_comparison_reports_faults_floor_and_allocator(bench, tmp_path):
    """End to end through the child processes: a tuned-allocator run writes the allocator
    setting, page faults per step and the memory floor into its JSON and Markdown."""
    out, md = tmp_path / "r.json", tmp_path / "b.md"
    argv = ["--against", "learn2learn", "--malloc", "tuned", "--steps", "1", "--warmup", "1",
            "--mem-steps", "1", "--meta-batch", "2", "--queries", "3",
            "--variants", "l2l@1t", "engine-cl@1t"]  # fmt: skip
    assert bench.main([*argv, "--out", str(out), "--markdown", str(md)]) == 0

    result = json.loads(out.read_text())
    assert result["setting"]["malloc_env"] == bench.MALLOC_TUNED
    for r in result["variants"]:
        assert r["minor_faults_per_step_median"] >= 0
    fwd, fb = (result["floor"][p]["above_idle_mib"] for p in bench.FLOOR_PROBES)
    # A backward needs the forward's activations and more: the probes measure real work.
    assert 0 < fwd < fb
    text = md.read_text()
    assert "MALLOC_TRIM_THRESHOLD_=268435456" in text and "memory floor" in text
