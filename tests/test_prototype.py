"""The nearest-prototype baseline (Snell et al. 2017; SimpleShot, Wang et al. 2019) against hand
computations on a backbone whose embeddings are known (the identity on flat inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from npbml.algorithms import build_algorithm
from npbml.algorithms.prototype import (
    PrototypeClassifier,
    class_prototypes,
    prototype_accuracy,
    prototype_logits,
)
from npbml.evaluate import evaluate
from npbml.models import Conv4
from tasks import Episode, TaskSampler, TensorClassDataset


class _Identity(nn.Module):
    """features(x) = x flattened (known embeddings); a scale parameter that must stay untouched,
    and a record of the mode the features were computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.head = nn.Linear(2, 2)
        self.modes: list[bool] = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.scale * x.flatten(1)


def _episode(support: list, sy: list, query: list, qy: list) -> Episode:
    return Episode(
        torch.tensor(support, dtype=torch.float32),
        torch.tensor(sy),
        torch.tensor(query, dtype=torch.float32),
        torch.tensor(qy),
        torch.arange(max(sy) + 1),
    )


# Class 0: shots (10, 0) and (0, 1); class 1: one shot (-1, 1). Query (0.2, 1).
# Euclidean: prototype 0 = (5, 0.5), squared distances 4.8^2 + 0.5^2 = 23.29 and 1.2^2 = 1.44,
# so class 1. Cosine: normalised shots (1, 0), (0, 1) -> prototype (0.5, 0.5) at 45 degrees; the
# query is at 78.7 degrees, class 1 at 135: 33.7 < 56.3 degrees, so class 0. Without the L2
# normalisation before averaging, prototype 0 would point at 5.7 degrees and class 1 would win.
HAND = _episode([[10, 0], [0, 1], [-1, 1]], [0, 0, 1], [[0.2, 1]], [0])


def test_euclidean_matches_closed_form() -> None:
    learner = PrototypeClassifier(_Identity(), distance="euclidean")
    fast = learner.adapt(HAND.support_x, HAND.support_y)
    assert torch.allclose(fast["prototypes"], torch.tensor([[5.0, 0.5], [-1.0, 1.0]]))
    logits = learner(HAND.query_x, fast)
    assert torch.allclose(logits, torch.tensor([[-23.29, -1.44]]), atol=1e-5)
    m = learner.evaluate(HAND)
    assert m["accuracy"] == 0.0 and m["accuracies"] == [0.0]
    assert m["loss"] == pytest.approx(float(np.log1p(np.exp(23.29 - 1.44))), rel=1e-5)


def test_cosine_normalises_before_averaging() -> None:
    learner = PrototypeClassifier(_Identity(), distance="cosine")
    fast = learner.adapt(HAND.support_x, HAND.support_y)
    s2 = float(1 / np.sqrt(2))
    assert torch.allclose(fast["prototypes"], torch.tensor([[0.5, 0.5], [-s2, s2]]))
    logits = learner(HAND.query_x, fast)
    q = np.array([0.2, 1.0]) / np.hypot(0.2, 1.0)
    expected = [q @ np.array([s2, s2]), q @ np.array([-s2, s2])]
    assert torch.allclose(logits, torch.tensor([expected], dtype=torch.float32), atol=1e-6)
    assert learner.evaluate(HAND)["accuracy"] == 1.0
    # Scale-free: any positive rescaling of the query or of a shot leaves the logits unchanged.
    assert torch.allclose(learner(7.0 * HAND.query_x, fast), logits, atol=1e-6)
    scaled = learner.adapt(HAND.support_x * torch.tensor([[3.0], [0.1], [9.0]]), HAND.support_y)
    assert torch.allclose(scaled["prototypes"], fast["prototypes"], atol=1e-6)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_random_episodes_match_an_independent_nearest_prototype(distance: str) -> None:
    g = torch.Generator().manual_seed(0)
    ways, shots, queries, dim = 4, 3, 5, 6
    learner = PrototypeClassifier(_Identity(), distance=distance)
    for _ in range(5):
        sy = torch.arange(ways).repeat_interleave(shots)[torch.randperm(ways * shots, generator=g)]
        qy = torch.arange(ways).repeat_interleave(queries)
        ep = Episode(
            torch.randn(ways * shots, dim, generator=g),
            sy,
            torch.randn(ways * queries, dim, generator=g),
            qy,
            torch.arange(ways),
        )
        s, q = ep.support_x.numpy().astype(np.float64), ep.query_x.numpy().astype(np.float64)
        if distance == "cosine":
            s = s / np.linalg.norm(s, axis=1, keepdims=True)
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
        protos = np.stack([s[sy.numpy() == k].mean(0) for k in range(ways)])
        if distance == "cosine":
            score = np.array([[qi @ p / np.linalg.norm(p) for p in protos] for qi in q])
        else:
            score = np.array([[-((qi - p) ** 2).sum() for p in protos] for qi in q])
        pred = score.argmax(1)
        m = learner.evaluate(ep)
        assert m["accuracy"] == pytest.approx(float((pred == qy.numpy()).mean()))
        logits = prototype_logits(
            ep.query_x, class_prototypes(ep.support_x, sy, ways, distance), distance
        )
        assert np.allclose(logits.numpy(), score, atol=1e-5)
        # The module-level function pre-training validates with gives the same accuracy.
        assert prototype_accuracy(_Identity(), ep, distance) == pytest.approx(m["accuracy"])


def test_trains_nothing_and_builds_from_the_registry() -> None:
    model = Conv4(1, 5, hidden=8, image_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = build_algorithm(
        "proto", model, inner_lr=0.4, inner_steps=5, eval_inner_steps=5, first_order=False
    )
    assert isinstance(learner, PrototypeClassifier) and learner.distance == "cosine"
    assert learner.meta_parameters() == [] and list(learner.named_meta_parameters()) == []
    assert not any(p.requires_grad for p in learner.parameters())
    data = TensorClassDataset.from_labels(torch.rand(40, 1, 16, 16), np.arange(40) % 8)
    sampler = TaskSampler(data, ways=5, shots=1, queries=2, seed=0)
    res = evaluate(learner, sampler, 6, per_task=True)
    assert len(res["accuracies"]) == 6 and 0.0 <= res["accuracy"] <= 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert build_algorithm("proto", Conv4(1, 5, hidden=8, image_size=16), distance="euclidean")
    # The same metrics keys as the gradient learners, for a meta-batch too.
    batch = Episode.stack([sampler.sample(i) for i in range(3)])
    m = learner.evaluate(batch)
    assert set(m) == {"loss", "accuracy", "losses", "accuracies"} and len(m["accuracies"]) == 3
    assert m["accuracies"] == [learner.evaluate(sampler.sample(i))["accuracy"] for i in range(3)]


def test_runs_the_backbone_in_eval_mode_and_restores_it() -> None:
    model = _Identity()
    learner = PrototypeClassifier(model)
    learner.train()
    learner.evaluate(HAND)
    assert model.modes == [False] and model.training


def test_bad_input_names_the_fix() -> None:
    with pytest.raises(ValueError, match="cosine, euclidean"):
        PrototypeClassifier(_Identity(), distance="manhattan")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="features"):
        PrototypeClassifier(nn.Linear(2, 2))
    learner = PrototypeClassifier(_Identity())
    with pytest.raises(ValueError, match="learner.adapt"):
        learner(HAND.query_x)
    with pytest.raises(ValueError, match="at least one support example"):
        class_prototypes(torch.zeros(2, 3), torch.tensor([0, 2]), 3)


def test_parallel_evaluation_gives_the_same_episodes_and_accuracies() -> None:
    learner = PrototypeClassifier(Conv4(1, 5, hidden=8, image_size=16), distance="euclidean")
    data = TensorClassDataset.from_labels(torch.rand(48, 1, 16, 16), np.arange(48) % 8)
    sampler = TaskSampler(data, ways=5, shots=1, queries=3, seed=1)
    one = evaluate(learner, sampler, 8, per_task=True)
    two = evaluate(learner, sampler, 8, per_task=True, workers=2)
    assert two["accuracies"] == one["accuracies"]
