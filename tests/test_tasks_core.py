"""Core episode machinery: Episode, TaskSampler, class views, get_tasksets."""

import numpy as np
import pytest
import torch

import tasks
from tasks import (
    ConcatClasses,
    Episode,
    EpisodeSpecError,
    RotatedClasses,
    SubsetClasses,
    TaskSampler,
    TensorClassDataset,
)


def _dataset(num_classes=10, per_class=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (num_classes * per_class, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = np.repeat(np.arange(num_classes), per_class)
    return TensorClassDataset.from_labels(data, labels)


def test_episode_layout_and_labels_match_classes():
    ds = _dataset()
    ep = TaskSampler(ds, ways=4, shots=2, queries=3, seed=5).sample()
    assert ep.support_x.shape == (8, 1, 4, 4) and ep.query_x.shape == (12, 1, 4, 4)
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ep.query_y.tolist() == [k for k in range(4) for _ in range(3)]
    assert len(set(ep.classes.tolist())) == 4
    # Every support/query image really belongs to the class its label stands for.
    for x, y in [(ep.support_x, ep.support_y), (ep.query_x, ep.query_y)]:
        for img, lab in zip(x, y):
            cls = int(ep.classes[lab])
            pool = ds.class_images(cls)
            assert any(torch.equal(img, p) for p in pool)


def test_support_and_query_are_disjoint_draws():
    ds = _dataset(per_class=5)
    ep = TaskSampler(ds, ways=3, shots=2, queries=3, seed=1).sample()
    for k in range(3):
        s = ep.support_x[ep.support_y == k]
        q = ep.query_x[ep.query_y == k]
        both = torch.cat([s, q]).flatten(1)
        assert len({tuple(r.tolist()) for r in both}) == 5  # all 5 images, none repeated


def test_determinism_and_index_addressing():
    ds = _dataset()
    a, b = TaskSampler(ds, 5, 1, 2, seed=3), TaskSampler(ds, 5, 1, 2, seed=3)
    for _ in range(5):
        ea, eb = a.sample(), b.sample()
        assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.classes, eb.classes)
    # Episode i is a pure function of (seed, i): direct indexing reproduces the stream.
    c = TaskSampler(ds, 5, 1, 2, seed=3)
    assert torch.equal(c.sample(4).query_x, ea.query_x)
    d = TaskSampler(ds, 5, 1, 2, seed=4)
    assert not all(torch.equal(d.sample(i).classes, c.sample(i).classes) for i in range(5))


def test_resume_from_state_dict():
    ds = _dataset()
    a = TaskSampler(ds, 3, 1, 1, seed=0)
    [a.sample() for _ in range(7)]
    state = a.state_dict()
    b = TaskSampler(ds, 3, 1, 1, seed=99)
    b.load_state_dict(state)
    assert torch.equal(a.sample().support_x, b.sample().support_x)


def test_stack_unstack_and_to():
    ds = _dataset()
    s = TaskSampler(ds, 3, 1, 2, seed=0)
    eps = [s.sample() for _ in range(4)]
    mb = Episode.stack(eps)
    assert mb.support_x.shape == (4, 3, 1, 4, 4) and mb.classes.shape == (4, 3) and len(mb) == 4
    assert all(torch.equal(u.query_x, e.query_x) for u, e in zip(mb.unstack(), eps))
    assert mb.to("cpu").support_x.device.type == "cpu"
    other = TaskSampler(ds, 4, 1, 2, seed=0).sample()
    with pytest.raises(ValueError, match="same ways"):
        Episode.stack([eps[0], other])


def test_clear_errors_for_impossible_specs():
    ds = _dataset(num_classes=5, per_class=4)
    with pytest.raises(EpisodeSpecError, match="only 5"):
        TaskSampler(ds, ways=6, shots=1, queries=1)
    with pytest.raises(EpisodeSpecError, match="lower shots or queries"):
        TaskSampler(ds, ways=2, shots=3, queries=2)


def test_class_views():
    ds = _dataset(num_classes=4, per_class=3)
    sub = SubsetClasses(ds, [2, 0])
    assert sub.num_classes == 2 and torch.equal(sub.class_images(0), ds.class_images(2))
    cat = ConcatClasses([ds, sub])
    assert cat.num_classes == 6 and torch.equal(cat.class_images(5), ds.class_images(0))
    rot = RotatedClasses(ds)
    assert rot.num_classes == 16
    assert torch.equal(rot.class_images(4 * 1 + 1), torch.rot90(ds.class_images(1), 1, (-2, -1)))
    with pytest.raises(IndexError):
        ds.images(4, [0])


def test_get_tasksets_generated_family_and_unknown_name():
    ts = tasks.get_tasksets(
        "glyphs", None, ways=5, shots=1, queries=2, num_train=10, num_validation=6, num_test=6
    )
    ep = ts.test.sample()
    assert ep.support_x.shape == (5, 1, 28, 28)
    assert ts.train.seed != ts.validation.seed != ts.test.seed
    with pytest.raises(ValueError, match="available: .*glyphs"):
        tasks.get_tasksets("no-such-data")
