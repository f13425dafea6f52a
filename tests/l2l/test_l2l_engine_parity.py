"""The benchmark's premise, tested: on learn2learn's own OmniglotCNN (a submodule registered
under two names, BatchNorm tracking running statistics), learn2learn 0.2.0's MAML
(clone/adapt/backward per task) and this engine give the same meta-gradient, second and first
order, sequential and task-parallel (scripts/bench_step.py --against learn2learn)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
