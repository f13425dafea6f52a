"""NPBML's batched inner loop (issue 13) against the straightforward per-task path, in float64.

The batched path (``NPBMLOptions.batch_tasks``, :mod:`npbml.algorithms.npbml.batched`) must be
the same math: meta-gradients, test predictions, losses and the safeguard's counts equal those of
``batch_tasks=False`` (one task at a time through ``GradientLearner._adapt``) to 1e-10. Also the
other issue-13 rewrites, each against its straightforward form: the vectorised weight statistics
of R, the relation network's split first convolution, the vmap-able one-hot.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from npbml.algorithms.npbml import NPBML
from npbml.algorithms.npbml.batched import batchable
from npbml.algorithms.npbml.layers.relation import RelationNetwork, _pairs
from npbml.algorithms.npbml.layers.task_loss import _tensor_statistics, one_hot, weight_statistics
from npbml.algorithms.npbml.layers.unfold import Unfolded
from npbml.models import Conv4
from tasks.episode import Episode

WAYS = 5
TOL = 1e-10


def _task(seed: int, queries: int = 3, shots: int = 1) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(WAYS).repeat(shots)
    qy = torch.arange(WAYS).repeat(queries)
    return Episode(
        torch.rand(len(sy), 1, 16, 16, generator=g, dtype=torch.float64),
        sy,
        torch.rand(len(qy), 1, 16, 16, generator=g, dtype=torch.float64),
        qy,
        torch.arange(WAYS),
    )


def _batch(n: int = 3, seed: int = 0) -> Episode:
    return Episode.stack([_task(seed + i) for i in range(n)])


def _pair(variant: str = "maxpool", encoder_blocks: int | None = None, **kw) -> tuple[NPBML, NPBML]:
    """The same learner twice (equal weights): batched and task by task, float64. With
    ``encoder_blocks`` the relation network reads the frozen features (with that many own
    blocks) instead of the images."""
    out = []
    for batch_tasks in (True, False):
        torch.manual_seed(0)
        model = Conv4(hidden=4, image_size=16, num_classes=WAYS, variant=variant)
        torch.manual_seed(1)
        if encoder_blocks is None:
            rel = RelationNetwork(channels=4, in_channels=1)
        else:
            rel = RelationNetwork(
                channels=4, reads="features", feature_blocks=3, encoder_blocks=encoder_blocks
            )
        learner = NPBML(
            model,
            inner_steps=3,
            inner_lr=0.1,
            relation_net=rel,
            loss_init_std=0.1,
            film_init_std=0.1,
            batch_tasks=batch_tasks,
            **kw,
        ).double()
        out.append(learner)
    return out[0], out[1]


def _meta_grads(learner: NPBML, batch: Episode, workers: int = 1) -> tuple[list, dict]:
    learner.zero_grad(set_to_none=True)
    metrics = learner.meta_backward(batch, workers=workers)
    return [p.grad for p in learner.meta_parameters()], metrics


def _assert_close(a: list, b: list) -> None:
    assert len(a) == len(b)
    reached = 0
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert float((x - y).abs().max()) <= TOL
            reached += bool(x.abs().sum() > 0)
    assert reached > 5  # init, warp, FiLM and the loss networks all get a meta-gradient


CASES = [
    {},
    {"first_order": True},
    {"head_init": "proto"},
    {"ablation": "+optimizer+loss"},
    {"reg_joint": False, "loss_inputs": "logits"},
    {"inner_max_grad_norm": 1e-3},  # the safeguard acts on every step
]


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
def test_batched_meta_gradient_equals_per_task(kw):
    batched, per_task = _pair(**kw)
    batch = _batch()
    assert batched.batches(batch.unstack()) and not per_task.batches(batch.unstack())
    g_b, m_b = _meta_grads(batched, batch)
    g_p, m_p = _meta_grads(per_task, batch)
    _assert_close(g_b, g_p)
    assert abs(m_b["loss"] - m_p["loss"]) <= TOL and m_b["accuracy"] == m_p["accuracy"]
    assert m_b["inner_clipped"] == m_p["inner_clipped"]
    if "inner_max_grad_norm" in kw:
        assert m_b["inner_clipped"] == 1.0


@pytest.mark.parametrize("kw", [{}, {"head_init": "proto"}], ids=["default", "proto"])
def test_batched_equals_per_task_with_the_adapted_input_unfolded(kw):
    """Conv4 strided: the adapted conv reads once-unfolded patches
    (npbml.algorithms.npbml.layers.unfold) on both paths; the batched one stacks them per task."""
    batched, per_task = _pair(variant="strided", **kw)
    batch = _batch()
    task = batch.unstack()[0]
    inputs = batched.inner_inputs(task.support_x, "second", task.support_y, task.query_x)
    assert isinstance(inputs[0], Unfolded)
    g_b, m_b = _meta_grads(batched, batch)
    g_p, m_p = _meta_grads(per_task, batch)
    _assert_close(g_b, g_p)
    e_b, e_p = batched.evaluate(batch), per_task.evaluate(batch)
    assert max(abs(a - b) for a, b in zip(e_b["losses"], e_p["losses"])) <= TOL


@pytest.mark.parametrize("encoder_blocks", [0, 1])
def test_batched_equals_per_task_with_a_feature_relation(encoder_blocks):
    """The relation network on the frozen features (issue 13's option), bare or with its own
    conv block: the same meta-gradients and test predictions on both paths."""
    batched, per_task = _pair(encoder_blocks=encoder_blocks)
    assert batched.relation_reads_features
    batch = _batch()
    g_b, _ = _meta_grads(batched, batch)
    g_p, _ = _meta_grads(per_task, batch)
    _assert_close(g_b, g_p)
    e_b, e_p = batched.evaluate(batch), per_task.evaluate(batch)
    assert e_b["accuracies"] == e_p["accuracies"]
    assert max(abs(a - b) for a, b in zip(e_b["losses"], e_p["losses"])) <= TOL


def test_batched_outer_loss_and_threads_equal_per_task():
    batched, per_task = _pair()
    batch = _batch(4)
    loss_b, _ = batched.outer_loss(batch)
    loss_p, _ = per_task.outer_loss(batch)
    assert abs(float(loss_b.detach()) - float(loss_p.detach())) <= TOL
    # two threads, each with a batched chunk of two tasks: the same gradient
    g_1, _ = _meta_grads(batched, batch, workers=1)
    g_2, m_2 = _meta_grads(batched, batch, workers=2)
    g_p, _ = _meta_grads(per_task, batch)
    _assert_close(g_2, g_p)
    _assert_close(g_1, g_2)
    assert m_2["finite"]


def test_batched_test_predictions_equal_per_task():
    batched, per_task = _pair()
    batch = _batch(4, seed=10)
    e_b, e_p = batched.evaluate(batch), per_task.evaluate(batch)
    assert e_b["accuracies"] == e_p["accuracies"]
    assert max(abs(a - b) for a, b in zip(e_b["losses"], e_p["losses"])) <= TOL
    assert abs(e_b["max_abs_logit"] - e_p["max_abs_logit"]) <= TOL
    with torch.no_grad():
        _, logits = batched.batched_task_losses(batch.unstack(), "none")
        for task, lg in zip(batch.unstack(), logits):
            fast = per_task.adapt(task.support_x, task.support_y, query_x=task.query_x)
            ref = per_task(task.query_x, fast)
            assert float((lg - ref).abs().max()) <= TOL


def test_unequal_tasks_fall_back_to_per_task():
    tasks = [_task(0), _task(1, queries=2)]
    assert not batchable(tasks)
    assert batchable([_task(0), _task(1)])
    batched, per_task = _pair()
    assert not batched.batches(tasks)
    assert not batched.batches([_task(0)])  # one task: nothing to batch


def test_weight_statistics_vectorised_equal_per_tensor_with_gradients():
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64).requires_grad_(),
        torch.zeros(5, dtype=torch.float64).requires_grad_(),  # constant: the eps guards
        torch.randn(5, 16, generator=g, dtype=torch.float64).requires_grad_(),
        torch.full((1,), 0.7, dtype=torch.float64).requires_grad_(),
    ]
    w = torch.randn(len(tensors), 4, generator=g, dtype=torch.float64)
    for normalize in (False, True):
        fast = weight_statistics(tensors, normalize)
        ref = torch.stack([_tensor_statistics(t, normalize, 1e-8) for t in tensors])
        assert float((fast - ref).detach().abs().max()) <= TOL
        g_fast = torch.autograd.grad((fast * w).sum(), tensors)
        g_ref = torch.autograd.grad((ref * w).sum(), tensors)
        for a, b in zip(g_fast, g_ref):
            assert float((a - b).abs().max()) <= TOL


def test_relation_split_first_convolution_equals_explicit_pairs():
    torch.manual_seed(0)
    net = RelationNetwork(channels=6, in_channels=1).double()
    q = torch.randn(7, 6, 5, 5, dtype=torch.float64)
    protos = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    split = net.relate(q, protos)
    explicit = net.relation(_pairs(q, protos))  # conv of the concatenations, as Sung et al.
    assert split.shape == explicit.shape == (21, 6, 2, 2)
    assert float((split - explicit).detach().abs().max()) <= TOL
    # pair i * N + j is query i with class j
    assert torch.equal(_pairs(q, protos)[1 * 3 + 2, :6], q[1])
    assert torch.equal(_pairs(q, protos)[1 * 3 + 2, 6:], protos[2])


def test_one_hot_equals_torch_and_batches_under_vmap():
    y = torch.tensor([[0, 2, 1], [1, 1, 0]])
    expected = F.one_hot(y, 3).double()
    assert torch.equal(one_hot(y, 3, torch.float64), expected)
    batched = torch.func.vmap(lambda t: one_hot(t, 3, torch.float64))(y)
    assert torch.equal(batched, expected)


def test_proto_head_second_order_inner_loop_takes_partial_derivatives():
    # The Proto-MAML head is computed from the body's initial weights; the second-order inner
    # loop must still step along the partial derivatives (as the first-order and test-time loops
    # do), not the total derivative through the prototypes. Failed before the fix.
    _, per_task = _pair(head_init="proto", inner_max_grad_norm=None)
    task = _task(3)
    logits = {}
    for mode in ("none", "first", "second"):
        fast = per_task._adapt(task.support_x, task.support_y, 2, mode, task.query_x)
        logits[mode] = per_task(task.query_x, fast).detach()
    assert float((logits["second"] - logits["none"]).abs().max()) <= TOL
    assert float((logits["first"] - logits["none"]).abs().max()) <= TOL


class _Fixed:
    """Fixed episodes by index (the EpisodeSource protocol of npbml.evaluate)."""

    def sample(self, i: int | None = None) -> Episode:
        return _task(100 + int(i or 0))


def test_evaluate_hands_batches_to_npbml_with_the_same_results():
    from npbml.evaluate import evaluate

    batched, per_task = _pair()
    assert batched.evaluation_batch == 16 and per_task.evaluation_batch == 1
    calls = []
    original = batched.evaluate

    def spy(episode, *a, **kw):
        calls.append(len(episode.unstack()) if episode.is_batched else 1)
        return original(episode, *a, **kw)

    batched.evaluate = spy  # an instance attribute, so only this test's object sees it
    r_b = evaluate(batched, _Fixed(), 34, per_task=True)
    r_p = evaluate(per_task, _Fixed(), 34, per_task=True)
    assert calls == [16, 16, 2]
    assert r_b["accuracies"] == r_p["accuracies"]
    assert abs(r_b["max_abs_logit"] - r_p["max_abs_logit"]) <= TOL
    assert r_b["diverged"] == r_p["diverged"] == 0


def test_episode_cache_gives_the_uncached_results_and_never_goes_stale():
    from npbml.algorithms.npbml.cache import EpisodeCache
    from npbml.evaluate import evaluate

    cached, _ = _pair()
    plain, _ = _pair(episode_cache=0)
    first = evaluate(cached, _Fixed(), 6, per_task=True)
    again = evaluate(cached, _Fixed(), 6, per_task=True)  # every episode from the cache
    ref = evaluate(plain, _Fixed(), 6, per_task=True)
    assert cached.episode_cache.hits > 0 and len(plain.episode_cache) == 0
    assert first["accuracies"] == again["accuracies"] == ref["accuracies"]
    assert first["max_abs_logit"] == again["max_abs_logit"] == ref["max_abs_logit"]
    # meta-training (gradients recorded) never reads or fills it
    n = len(cached.episode_cache)
    cached.meta_backward(_batch())
    assert len(cached.episode_cache) == n
    # a frozen weight changed in place (as load_state_dict does): a miss, not a stale entry
    task = _task(100)
    with torch.no_grad():
        before = cached.evaluate(task)["losses"][0]
        cached.network.blocks[0].conv.weight.mul_(1.5)
        plain.network.blocks[0].conv.weight.mul_(1.5)
        after = cached.evaluate(task)["losses"][0]
    assert after != before
    assert abs(after - plain.evaluate(task)["losses"][0]) <= TOL
    # bounded, least recently used first
    lru = EpisodeCache(2)
    for i in range(4):
        lru.get("x", [torch.tensor([float(i)])], [], lambda i=i: i)
    assert len(lru) == 2 and lru.get("x", [torch.tensor([3.0])], [], lambda: -1) == 3
    assert lru.get("x", [torch.tensor([0.0])], [], lambda: -1) == -1


def test_a_learner_with_an_episode_cache_deep_copies_and_pickles():
    import copy
    import io

    learner, _ = _pair()
    learner.evaluate(_task(5))
    assert len(learner.episode_cache) > 0
    twin = copy.deepcopy(learner)
    assert len(twin.episode_cache) == 0 and twin.episode_cache.size == learner.episode_cache.size
    assert twin.evaluate(_task(5))["accuracies"] == learner.evaluate(_task(5))["accuracies"]
    buf = io.BytesIO()
    torch.save(learner, buf)
    buf.seek(0)
    assert len(torch.load(buf, weights_only=False).episode_cache) == 0
