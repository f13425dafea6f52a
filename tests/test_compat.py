"""torchmeta / learn2learn adapters, exercised the way users of those libraries write loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tasks import EpisodeSource, EpisodeSpecError, TaskSampler, TensorClassDataset
from tasks.compat import EpisodesFromCallable, L2LTaskView, TorchmetaBatches

WAYS, SHOTS, QUERIES = 5, 2, 3


def make_dataset(classes: int = 12, per_class: int = 10) -> TensorClassDataset:
    """Images whose pixels encode (class, index): class c has mean 10*c, so classes separate."""
    rng = np.random.default_rng(0)
    n = classes * per_class
    labels = np.repeat(np.arange(classes), per_class)
    data = rng.integers(0, 5, size=(n, 1, 4, 4)) + 10 * labels[:, None, None, None]
    data[:, 0, 0, 0] = np.tile(np.arange(per_class), classes)  # image index in its class
    return TensorClassDataset.from_labels(torch.as_tensor(data, dtype=torch.uint8), labels)


def prototype_accuracy(sx, sy, qx, qy) -> float:
    """Nearest-class-mean accuracy (Snell et al., 2017), written out by hand."""
    protos = torch.stack([sx[sy == k].mean(0) for k in range(int(sy.max()) + 1)])
    d = ((qx.flatten(1)[:, None] - protos.flatten(1)[None]) ** 2).sum(-1)
    return float((d.argmin(1) == qy).float().mean())


def assert_same_episode(a, sx, sy, qx, qy) -> None:
    assert torch.equal(a.support_x, sx) and torch.equal(a.support_y, sy)
    assert torch.equal(a.query_x, qx) and torch.equal(a.query_y, qy)


def test_torchmeta_style_loop() -> None:
    ds = make_dataset()
    loader = TorchmetaBatches(TaskSampler(ds, WAYS, SHOTS, QUERIES, seed=7), 4, num_batches=3)
    reference = TaskSampler(ds, WAYS, SHOTS, QUERIES, seed=7)
    assert len(loader) == 3
    seen = 0
    for batch_idx, batch in enumerate(loader):
        train_inputs, train_targets = batch["train"]
        test_inputs, test_targets = batch["test"]
        assert train_inputs.shape == (4, WAYS * SHOTS, 1, 4, 4)
        assert train_targets.shape == (4, WAYS * SHOTS)
        assert test_inputs.shape == (4, WAYS * QUERIES, 1, 4, 4)
        assert test_targets.shape == (4, WAYS * QUERIES)
        assert train_targets.dtype == torch.int64
        for task_idx, (tr_x, tr_y, te_x, te_y) in enumerate(
            zip(train_inputs, train_targets, test_inputs, test_targets)
        ):
            assert sorted(tr_y.tolist()) == sorted(list(range(WAYS)) * SHOTS)
            assert sorted(te_y.tolist()) == sorted(list(range(WAYS)) * QUERIES)
            # Support and query labels agree: class means classify every query correctly.
            assert prototype_accuracy(tr_x.float(), tr_y, te_x.float(), te_y) == 1.0
            # The same episodes as drawing from the sampler directly.
            assert_same_episode(reference.sample(batch_idx * 4 + task_idx), tr_x, tr_y, te_x, te_y)
        seen += 1
    assert seen == 3


def test_torchmeta_batches_infinite_and_bad_args() -> None:
    sampler = TaskSampler(make_dataset(), WAYS, SHOTS, QUERIES, seed=1)
    loader = TorchmetaBatches(sampler, batch_size=2)
    batches = list(itertools.islice(loader, 5))
    assert len(batches) == 5 and sampler.index == 10  # consumed the sampler's stream in order
    with pytest.raises(TypeError, match="infinite"):
        len(loader)
    with pytest.raises(ValueError, match="batch_size"):
        TorchmetaBatches(sampler, 0)


def l2l_partition(x: torch.Tensor, y: torch.Tensor, shots: int):
    """learn2learn's partition_task contract: per sorted label, its first ``shots`` rows support."""
    sx, sy, qx, qy = [], [], [], []
    for lab in torch.unique(y):
        rows = torch.nonzero(y == lab).flatten()
        sx.append(x[rows[:shots]])
        sy.append(y[rows[:shots]])
        qx.append(x[rows[shots:]])
        qy.append(y[rows[shots:]])
    return (torch.cat(sx), torch.cat(sy)), (torch.cat(qx), torch.cat(qy))


def test_learn2learn_style_tasks() -> None:
    ds = make_dataset()
    taskset = L2LTaskView(TaskSampler(ds, WAYS, SHOTS, QUERIES, seed=3))
    reference = TaskSampler(ds, WAYS, SHOTS, QUERIES, seed=3)
    for i in range(4):
        X, y = taskset.sample()
        assert X.shape == (WAYS * (SHOTS + QUERIES), 1, 4, 4) and y.shape == (len(X),)
        assert set(y.tolist()) == set(range(WAYS))
        # A learn2learn user splits with index masks ...
        adaptation = torch.zeros(len(X), dtype=torch.bool)
        adaptation[: taskset.num_support] = True
        (sx, sy), (qx, qy) = taskset.split(X, y)
        assert torch.equal(sx, X[adaptation]) and torch.equal(qx, X[~adaptation])
        # ... or with partition_task: both give exactly the sampler's episode.
        (px, py), (pqx, pqy) = l2l_partition(X, y, SHOTS)
        ep = reference.sample(i)
        assert_same_episode(ep, sx, sy, qx, qy)
        assert_same_episode(ep, px, py, pqx, pqy)
    X, y = next(iter(taskset))  # iteration continues the same stream
    assert torch.equal(X[: WAYS * SHOTS], reference.sample(4).support_x)
    assert torch.equal(taskset.sample(0)[0], L2LTaskView(reference).sample(0)[0])
    with pytest.raises(ValueError, match="cannot split"):
        taskset.split(X, y[:-1])


def test_episodes_from_callable_round_trip() -> None:
    ds = make_dataset()
    view = L2LTaskView(TaskSampler(ds, WAYS, SHOTS, QUERIES, seed=11))
    source = EpisodesFromCallable(view.sample, WAYS, SHOTS, QUERIES, index_fn=view.sample)
    assert isinstance(source, EpisodeSource)
    reference = TaskSampler(ds, WAYS, SHOTS, QUERIES, seed=11)
    for i in range(3):
        ep, ref = source.sample(), reference.sample(i)
        assert_same_episode(ref, ep.support_x, ep.support_y, ep.query_x, ep.query_y)
        assert ep.classes.tolist() == list(range(WAYS))
    assert torch.equal(source.sample(7).query_x, reference.sample(7).query_x)
    # And back into torchmeta layout: adapters compose.
    batch = next(iter(TorchmetaBatches(source, batch_size=2)))
    assert batch["train"][0].shape == (2, WAYS * SHOTS, 1, 4, 4)


def test_episodes_from_callable_relabels_shuffled_tasks() -> None:
    rng = np.random.default_rng(0)
    original = np.array([17, 3, 42])
    y = np.repeat(original, 4)  # 3 ways, 1 shot + 3 queries
    x = torch.arange(12, dtype=torch.float32)[:, None] * 1.0
    perm = rng.permutation(12)
    task = (x[perm], torch.as_tensor(y[perm]))
    ep = EpisodesFromCallable(lambda: task, ways=3, shots=1, queries=3).sample()
    first_seen = list(dict.fromkeys(y[perm].tolist()))  # labels in order of first appearance
    assert ep.classes.tolist() == first_seen
    assert ep.support_y.tolist() == [0, 1, 2]
    assert ep.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for k, lab in enumerate(first_seen):
        rows = [int(r) for r in perm if y[r] == lab]  # original rows of this class, in task order
        assert ep.support_x[k].item() == rows[0]
        assert ep.query_x[3 * k : 3 * k + 3].flatten().tolist() == rows[1:]
    # numpy tasks are accepted too.
    ep2 = EpisodesFromCallable(lambda: (x.numpy(), y), 3, 2, 2).sample()
    assert ep2.support_x.flatten().tolist() == [0, 1, 4, 5, 8, 9]


def test_episodes_from_callable_errors() -> None:
    x = torch.zeros(12, 2)
    y = torch.as_tensor(np.repeat([0, 1, 2], 4))
    with pytest.raises(EpisodeSpecError, match="3 distinct labels, expected ways=2"):
        EpisodesFromCallable(lambda: (x, y), 2, 1, 3).sample()
    with pytest.raises(EpisodeSpecError, match="has 4 examples, expected shots \\+ queries"):
        EpisodesFromCallable(lambda: (x, y), 3, 1, 2).sample()
    with pytest.raises(EpisodeSpecError, match="must return \\(X, y\\)"):
        EpisodesFromCallable(lambda: x, 3, 1, 3).sample()
    with pytest.raises(EpisodeSpecError, match="integers"):
        EpisodesFromCallable(lambda: (x, y + 0.5), 3, 1, 3).sample()
    with pytest.raises(EpisodeSpecError, match="one label per row"):
        EpisodesFromCallable(lambda: (x, y[:-1]), 3, 1, 3).sample()
    with pytest.raises(ValueError, match="index_fn"):
        EpisodesFromCallable(lambda: (x, y), 3, 1, 3).sample(0)
    with pytest.raises(EpisodeSpecError, match="shots >= 1"):
        EpisodesFromCallable(lambda: (x, y), 3, 0, 3)
