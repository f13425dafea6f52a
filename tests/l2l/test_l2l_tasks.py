"""learn2learn tasksets as npbml episode sources, and npbml samplers inside learn2learn code.

Every learn2learn object here is real (``l2l.data.MetaDataset``, ``Taskset`` with learn2learn's own
NWays / KShots / LoadData / RemapLabels transforms, ``partition_task``, ``algorithms.MAML``)."""

from __future__ import annotations

import random

import learn2learn as l2l
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from tasks import EpisodeSource, EpisodeSpecError, TaskSampler, TensorClassDataset
from tasks.compat import EpisodesFromCallable, EpisodesFromTaskset, L2LTaskView

T = l2l.data.transforms
CLASSES, PER_CLASS = 10, 8
WAYS, SHOTS, QUERIES = 4, 2, 3


def make_meta_dataset() -> l2l.data.MetaDataset:
    """Row ``r`` of class ``c`` is the vector ``[100 c + r, r]``: each row names its class and
    itself, so the tests can check labels and disjointness from the data alone."""
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    rows = torch.arange(CLASSES * PER_CLASS)
    x = torch.stack([100.0 * labels + rows, rows.double()], dim=1).float()
    return l2l.data.MetaDataset(TensorDataset(x, labels))


def make_taskset(meta, num_tasks: int = -1, fused: bool = False) -> l2l.data.Taskset:
    k = SHOTS + QUERIES
    if fused:
        head = [T.FusedNWaysKShots(meta, n=WAYS, k=k)]
    else:
        head = [T.NWays(meta, n=WAYS), T.KShots(meta, k=k)]
    tail = [T.LoadData(meta), T.RemapLabels(meta), T.ConsecutiveLabels(meta)]
    return l2l.data.Taskset(meta, task_transforms=head + tail, num_tasks=num_tasks)


def check_episode(ep) -> None:
    """Labels 0..N-1 grouped by class, every row of class k from dataset class classes[k], support
    and query disjoint."""
    assert ep.support_y.tolist() == np.repeat(np.arange(WAYS), SHOTS).tolist()
    assert ep.query_y.tolist() == np.repeat(np.arange(WAYS), QUERIES).tolist()
    assert len(set(ep.classes.tolist())) == WAYS
    for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
        dataset_class = (x[:, 0] - x[:, 1]) / 100
        assert torch.equal(dataset_class.long(), ep.classes[y])
    rows = torch.cat([ep.support_x[:, 1], ep.query_x[:, 1]])
    assert len(torch.unique(rows)) == WAYS * (SHOTS + QUERIES)


def same(a, b) -> bool:
    return all(
        torch.equal(getattr(a, f), getattr(b, f))
        for f in ("support_x", "support_y", "query_x", "query_y", "classes")
    )


def test_taskset_becomes_seeded_episode_source() -> None:
    meta = make_meta_dataset()
    source = EpisodesFromTaskset(make_taskset(meta), WAYS, SHOTS, QUERIES, seed=7)
    assert isinstance(source, EpisodeSource)
    py_state, np_state, torch_state = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
    )
    stream = [source.sample() for _ in range(6)]
    # Sampling leaves the caller's global random streams exactly where they were.
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:3], np_state[1:3]))
    assert torch.equal(torch.get_rng_state(), torch_state)
    for ep in stream:
        check_episode(ep)
    # Episode i is a pure function of (seed, i): by index, from a fresh source, from a taskset
    # with a finite num_tasks (its description cache is bypassed), whatever the global seeds.
    random.seed(123)
    torch.manual_seed(123)
    again = EpisodesFromTaskset(make_taskset(meta, num_tasks=3), WAYS, SHOTS, QUERIES, seed=7)
    assert same(again.sample(4), stream[4]) and same(source.sample(1), stream[1])
    assert same(again.sample(), stream[0])
    other = EpisodesFromTaskset(make_taskset(meta), WAYS, SHOTS, QUERIES, seed=8)
    assert not all(same(a, b) for a, b in zip(stream, [other.sample(i) for i in range(6)]))
    # The draws are not degenerate: different episodes get different class sets.
    assert len({tuple(sorted(ep.classes.tolist())) for ep in stream}) > 1


def test_fused_transform_meta_batches_and_resume() -> None:
    meta = make_meta_dataset()
    source = EpisodesFromTaskset(make_taskset(meta, fused=True), WAYS, SHOTS, QUERIES, seed=1)
    batch = source.sample_batch(3)
    assert batch.support_x.shape == (3, WAYS * SHOTS, 2)
    assert batch.query_y.shape == (3, WAYS * QUERIES) and batch.classes.shape == (3, WAYS)
    for ep in batch.unstack():
        check_episode(ep)
    state = source.state_dict()
    nxt = source.sample()
    resumed = EpisodesFromTaskset(make_taskset(meta, fused=True), WAYS, SHOTS, QUERIES, seed=0)
    resumed.load_state_dict(state)
    assert same(resumed.sample(), nxt)


def test_callable_adapter_on_a_real_taskset() -> None:
    taskset = make_taskset(make_meta_dataset())
    source = EpisodesFromCallable(taskset.sample, WAYS, SHOTS, QUERIES)
    ep = source.sample()
    # Task labels are learn2learn's RemapLabels ids here; data still matches labels per class.
    dataset_class = ((ep.support_x[:, 0] - ep.support_x[:, 1]) / 100).long()
    for k in range(WAYS):
        assert len(torch.unique(dataset_class[ep.support_y == k])) == 1
    assert ep.query_x.shape == (WAYS * QUERIES, 2)


def test_taskset_spec_errors() -> None:
    meta = make_meta_dataset()
    with pytest.raises(EpisodeSpecError, match="NWays draws n=4 classes but ways=5"):
        EpisodesFromTaskset(make_taskset(meta), 5, SHOTS, QUERIES)
    with pytest.raises(EpisodeSpecError, match="KShots\\(dataset, k=4\\)"):
        EpisodesFromTaskset(make_taskset(meta), WAYS, SHOTS, 2)
    with pytest.raises(TypeError, match="learn2learn Taskset"):
        EpisodesFromTaskset(lambda: None, WAYS, SHOTS, QUERIES)


def test_npbml_sampler_where_learn2learn_expects_a_taskset() -> None:
    """learn2learn's example loop (sample -> partition_task -> clone/adapt -> query backward) runs
    on an npbml TaskSampler through L2LTaskView and sees exactly the sampler's episodes."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 6)
    images = rng.integers(0, 255, size=(len(labels), 1, 3, 3), dtype=np.uint8)
    dataset = TensorClassDataset.from_labels(torch.as_tensor(images), labels)
    taskset = L2LTaskView(TaskSampler(dataset, WAYS, SHOTS, QUERIES, seed=5))
    reference = TaskSampler(dataset, WAYS, SHOTS, QUERIES, seed=5)
    torch.manual_seed(0)
    maml = l2l.algorithms.MAML(nn.Sequential(nn.Flatten(), nn.Linear(9, WAYS)), lr=0.5)
    for i in range(3):
        X, y = taskset.sample()
        (sx, sy), (qx, qy) = l2l.data.partition_task(X, y, shots=SHOTS)
        ep = reference.sample(i)
        assert torch.equal(sx, ep.support_x) and torch.equal(sy, ep.support_y)
        assert torch.equal(qx, ep.query_x) and torch.equal(qy, ep.query_y)
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner(sx), sy))
        maml.zero_grad()
        F.cross_entropy(learner(qx), qy).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in maml.parameters())
    X7, _ = taskset[7]  # TaskDataset-style indexing
    assert torch.equal(X7[: WAYS * SHOTS], reference.sample(7).support_x)
