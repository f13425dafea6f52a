"""Evaluation: the 95% interval against a hand computation, fixed episodes, Lake error rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from npbml.evaluate import evaluate, evaluate_lake, mean_confidence_interval
from tasks import Episode, TaskSampler, TensorClassDataset


def test_confidence_interval_by_hand():
    # values 0.2, 0.4, 0.6, 0.8: mean 0.5; squared deviations 0.09, 0.01, 0.01, 0.09 sum to 0.2.
    # ddof=1: s = sqrt(0.2 / 3) = 0.2581989; h = 1.96 * s / sqrt(4) = 0.2530349.
    mean, h = mean_confidence_interval([0.2, 0.4, 0.6, 0.8])
    assert mean == pytest.approx(0.5, abs=1e-15)
    assert h == pytest.approx(0.98 * math.sqrt(0.2 / 3), rel=1e-12)
    assert h == pytest.approx(0.2530349, abs=1e-7)
    # ddof=0 (MAML's np.std): s = sqrt(0.2 / 4) = 0.2236068; h = 0.2191347.
    _, h0 = mean_confidence_interval([0.2, 0.4, 0.6, 0.8], ddof=0)
    assert h0 == pytest.approx(0.2191347, abs=1e-7)


def test_confidence_interval_edge_cases():
    assert mean_confidence_interval(torch.full((10,), 0.7)) == pytest.approx((0.7, 0.0))
    mean, h = mean_confidence_interval([0.3])
    assert mean == 0.3 and math.isnan(h)
    with pytest.raises(ValueError, match="at least one"):
        mean_confidence_interval([])


def test_confidence_interval_matches_numpy_on_random_values():
    x = np.random.default_rng(0).random(600)
    mean, h = mean_confidence_interval(x)
    assert mean == pytest.approx(x.mean())
    assert h == pytest.approx(1.96 * x.std(ddof=1) / math.sqrt(600))


def _sampler(seed: int = 3) -> TaskSampler:
    data = torch.arange(12 * 4, dtype=torch.uint8).reshape(48, 1, 1, 1)
    ds = TensorClassDataset.from_labels(data, np.repeat(np.arange(12), 4))
    return TaskSampler(ds, ways=3, shots=1, queries=2, seed=seed)


class RecordingLearner:
    """Accuracy = a deterministic function of the episode's classes; records what it saw."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def evaluate(self, episode: Episode) -> dict[str, float]:
        self.seen.append(episode.classes.clone())
        return {"accuracy": float(episode.classes.sum()) / 33.0}


def test_evaluate_uses_fixed_episodes_and_leaves_the_stream_alone():
    sampler = _sampler()
    sampler.sample()
    sampler.sample()  # stream at index 2: evaluation must not depend on or move it
    learner = RecordingLearner()
    res = evaluate(learner, sampler, 7)
    assert sampler.index == 2
    assert res["tasks"] == 7
    expected = [sampler.sample(i).classes for i in range(7)]
    assert all(torch.equal(a, b) for a, b in zip(learner.seen, expected, strict=True))
    accs = [float(c.sum()) / 33.0 for c in expected]
    assert (res["accuracy"], res["ci95"]) == pytest.approx(mean_confidence_interval(accs))
    # Reproducible: a fresh sampler with the same seed gives the same result.
    assert evaluate(RecordingLearner(), _sampler(), 7) == res
    with pytest.raises(ValueError):
        evaluate(learner, sampler, 0)


class FakeRuns:
    """Three runs of 20 items; the learner below gets ``errors[r]`` of run r wrong."""

    errors = (0, 3, 20)

    def __len__(self) -> int:
        return len(self.errors)

    def episode(self, r: int) -> Episode:
        y = torch.arange(20)
        x = torch.zeros(20, 1, 2, 2)
        return Episode(x, y, x.clone(), y.clone(), torch.tensor([r] * 20))


class CountingLearner:
    def evaluate(self, episode: Episode) -> dict[str, float]:
        r = int(episode.classes[0])
        return {"accuracy": (20 - FakeRuns.errors[r]) / 20}


def test_evaluate_lake_error_rate():
    res = evaluate_lake(CountingLearner(), FakeRuns())
    assert res["per_run_errors"] == [0, 3, 20]
    assert (res["errors"], res["items"], res["runs"]) == (23, 60, 3)
    assert res["error_rate"] == pytest.approx(23 / 60)


def test_evaluate_per_task_returns_each_episode_in_index_order():
    sampler = _sampler()
    res = evaluate(RecordingLearner(), sampler, 5, per_task=True)
    expected = [float(sampler.sample(i).classes.sum()) / 33.0 for i in range(5)]
    assert res["accuracies"] == pytest.approx(expected)
    assert res["accuracy"] == pytest.approx(np.mean(expected))
    assert "accuracies" not in evaluate(RecordingLearner(), sampler, 5)


def test_paired_difference_by_hand():
    from npbml.evaluate import paired_difference

    # a - b = 0.2, 0.0, 0.4, -0.2: mean 0.1; squared deviations 0.01, 0.01, 0.09, 0.09 sum to
    # 0.2; s = sqrt(0.2 / 3); h = 1.96 * s / 2 = 0.2530349. One tie, one loss, two wins.
    a = [0.8, 0.6, 1.0, 0.4]
    b = [0.6, 0.6, 0.6, 0.6]
    d = paired_difference(a, b)
    assert d["mean"] == pytest.approx(0.1, abs=1e-12)
    assert d["ci95"] == pytest.approx(0.2530349, abs=1e-7)
    assert (d["n"], d["wins"], d["losses"], d["ties"]) == (4, 2, 1, 1)
    # Pairing matters: the unpaired intervals are wider than the paired one would be for
    # correlated learners (b = a - 0.1 + tiny noise): paired h is ~0, unpaired h is not.
    x = np.random.default_rng(0).random(50)
    tight = paired_difference(x, x - 0.1)
    assert tight["mean"] == pytest.approx(0.1) and tight["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert mean_confidence_interval(x)[1] > 0.05
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference([0.1, 0.2], [0.3])


def test_pooled_paired_difference_by_hand():
    from npbml.evaluate import paired_difference, pooled_paired_difference

    # Two seeds, three shared episodes. Differences: seed 0: 0.1, 0.2, 0.3 (mean 0.2);
    # seed 1: 0.3, 0.0, 0.0 (mean 0.1). Pooled mean 0.15; seed sd = sqrt(0.005) (ddof=1).
    # Seed-averaged per-episode differences 0.2, 0.1, 0.15: mean 0.15, deviations 0.05, -0.05,
    # 0 -> s = sqrt(0.005 / 2) = 0.05, h = 1.96 * 0.05 / sqrt(3).
    a = [[0.6, 0.7, 0.8], [0.8, 0.5, 0.5]]
    b = [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    p = pooled_paired_difference(a, b)
    assert p["mean"] == pytest.approx(0.15)
    assert p["seed_sd"] == pytest.approx(math.sqrt(0.005))
    assert p["ci95"] == pytest.approx(1.96 * 0.05 / math.sqrt(3))
    assert (p["seeds"], p["n"]) == (2, 3)
    assert p["per_seed"][1] == paired_difference(a[1], b[1])
    assert p["per_seed"][0]["mean"] == pytest.approx(0.2)
    assert math.isnan(pooled_paired_difference(a[:1], b[:1])["seed_sd"])
    with pytest.raises(ValueError, match="same shape"):
        pooled_paired_difference(a, [[0.5, 0.5], [0.5, 0.5]])


def test_evaluate_counts_diverged_episodes():
    from npbml.evaluate import DIVERGED_LOGIT, evaluate

    peaks = [1.0, DIVERGED_LOGIT * 2, float("inf"), 50.0]

    class Fake:
        def evaluate(self, episode):
            return {"accuracy": 0.5, "max_abs_logit": peaks[int(episode)]}

    class Source:
        def sample(self, i):
            return i

    out = evaluate(Fake(), Source(), len(peaks))
    assert out["diverged"] == 2 and out["max_abs_logit"] == float("inf")
    assert evaluate(Fake(), Source(), 1)["diverged"] == 0
