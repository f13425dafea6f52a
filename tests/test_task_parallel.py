"""Task-parallel meta-gradients (npbml.algorithms.task_parallel): same bits as one thread."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from npbml.algorithms import MAML, MetaSGD
from npbml.algorithms.npbml import NPBML
from npbml.algorithms.npbml.layers.relation import RelationNetwork
from npbml.algorithms.task_parallel import parallel_map, parallel_task_gradients, replicate
from npbml.models import Conv4
from npbml.params import functional_forward
from tasks.episode import Episode

WAYS = 3


def _batch(tasks: int = 5, size: int = 16, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    eps = [
        Episode(
            torch.rand(WAYS * 2, 1, size, size, generator=g),
            torch.arange(WAYS).repeat(2),
            torch.rand(WAYS * 3, 1, size, size, generator=g),
            torch.arange(WAYS).repeat(3),
            torch.arange(WAYS),
        )
        for _ in range(tasks)
    ]
    return Episode.stack(eps)


def _grads(learner: nn.Module, batch: Episode, workers: int) -> tuple[list, dict]:
    learner.zero_grad(set_to_none=True)
    metrics = learner.meta_backward(batch, workers=workers)
    return [None if p.grad is None else p.grad.clone() for p in learner.parameters()], metrics


def _assert_bit_identical(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)


@pytest.mark.parametrize("first_order", [False, True])
def test_parallel_maml_gradient_is_bit_identical(first_order):
    torch.manual_seed(0)
    learner = MAML(Conv4(hidden=8, image_size=16, num_classes=WAYS), inner_lr=0.3, inner_steps=2)
    learner.first_order = first_order
    batch = _batch()
    seq, m1 = _grads(learner, batch, workers=1)
    par, m2 = _grads(learner, batch, workers=2)
    _assert_bit_identical(seq, par)
    assert m1 == m2
    # And it is the outer_loss gradient (an independent code path), up to float reassociation.
    learner.zero_grad(set_to_none=True)
    learner.outer_loss(batch)[0].backward()
    for p, g in zip(learner.parameters(), par):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_parallel_sees_attribute_changes_between_calls():
    """Replicas are rebuilt per call: switching first_order changes the parallel gradient too."""
    torch.manual_seed(0)
    learner = MAML(Conv4(hidden=8, image_size=16, num_classes=WAYS), inner_lr=0.3)
    batch = _batch(tasks=3)
    second, _ = _grads(learner, batch, workers=2)
    learner.first_order = True
    first_par, _ = _grads(learner, batch, workers=2)
    first_seq, _ = _grads(learner, batch, workers=1)
    _assert_bit_identical(first_par, first_seq)
    assert not all(torch.equal(a, b) for a, b in zip(second, first_par))


def test_parallel_npbml_and_metasgd_are_bit_identical():
    torch.manual_seed(0)
    model = Conv4(hidden=4, image_size=16, num_classes=WAYS)
    npbml = NPBML(
        model,
        inner_steps=2,
        inner_lr=0.1,
        relation_net=RelationNetwork(channels=4, in_channels=1),
        batch_tasks=False,  # task by task: the bitwise claim (the batched path: test_npbml_batched)
    )
    batch = _batch(tasks=4)
    seq, m1 = _grads(npbml, batch, workers=1)
    par, m2 = _grads(npbml, batch, workers=3)
    _assert_bit_identical(seq, par)
    assert m1["loss"] == m2["loss"] and m2["finite"]
    assert sum(g is not None for g in par) > 5  # init, warp, FiLM, loss network all reached

    torch.manual_seed(0)
    msgd = MetaSGD(Conv4(hidden=4, image_size=16, num_classes=WAYS), inner_lr=0.1)
    _assert_bit_identical(_grads(msgd, batch, 1)[0], _grads(msgd, batch, 2)[0])


def test_parallel_accumulates_into_existing_grads():
    torch.manual_seed(0)
    learner = MAML(Conv4(hidden=4, image_size=16, num_classes=WAYS), inner_lr=0.3)
    batch = _batch(tasks=2)
    for workers in (1, 2):
        learner.zero_grad(set_to_none=True)
        learner.meta_backward(batch, workers=workers)
        learner.meta_backward(batch, workers=workers)
        twice = [p.grad.clone() for p in learner.parameters()]
        learner.zero_grad(set_to_none=True)
        learner.meta_backward(batch, workers=workers)
        for p, t in zip(learner.parameters(), twice):
            torch.testing.assert_close(2 * p.grad, t)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.features = nn.Sequential(self.base, nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_replicate_shares_tensors_not_modules():
    model = _Shared()
    rep = replicate(model)
    assert rep is not model and rep.base is not model.base
    assert rep.features[0] is rep.base  # a module registered twice stays one object
    for (n, p), (m, q) in zip(model.named_parameters(), rep.named_parameters()):
        assert n == m and p is q
    for b, c in zip(model.buffers(), rep.buffers()):
        assert b is c
    # functional_call on the replica leaves the original's attributes alone.
    x = torch.randn(6, 4)
    new = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    out = functional_forward(rep, new, x)
    assert torch.equal(out, torch.zeros(6, 2))
    assert model.base[0].weight is dict(model.named_parameters())["base.0.weight"]
    assert isinstance(model.base[0].weight, nn.Parameter)


def test_parallel_task_gradients_order_and_errors():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    holder = nn.Module()
    holder.w = w
    tasks = [torch.tensor([float(i), 1.0]) for i in range(5)]

    def task_fn(rep: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        return (rep.w * x).sum() ** 2, float(x[0])

    out = parallel_task_gradients(holder, tasks, [w], task_fn, workers=2, divisor=5)
    for i, (grads, loss, acc) in enumerate(out):
        s = float(w[0].detach() * i + w[1].detach())
        assert acc == i and loss == pytest.approx(s**2)
        torch.testing.assert_close(grads[0], 2 * s * tasks[i] / 5)  # closed form
    with pytest.raises(ValueError, match="workers"):
        parallel_task_gradients(holder, tasks, [w], task_fn, workers=0)


def test_engine_on_shared_module_with_running_stats_in_parallel():
    """learn2learn's OmniglotCNN layout (submodule under two names, BN tracking statistics)."""
    torch.manual_seed(0)
    model = _Shared()
    learner = MAML(model, inner_lr=0.2)
    g = torch.Generator().manual_seed(1)
    eps = [
        Episode(
            torch.randn(4, 4, generator=g),
            torch.tensor([0, 1, 0, 1]),
            torch.randn(6, 4, generator=g),
            torch.tensor([0, 1, 0, 1, 0, 1]),
            torch.arange(2),
        )
        for _ in range(4)
    ]
    batch = Episode.stack(eps)
    seq, _ = _grads(learner, batch, workers=1)
    par, _ = _grads(learner, batch, workers=2)
    _assert_bit_identical(seq, par)
    # Hand-written reference for the first task's contribution (second order, one step).
    params = dict(model.named_parameters())
    total = [torch.zeros_like(p) for p in params.values()]
    for ep in eps:
        loss = F.cross_entropy(functional_forward(model, params, ep.support_x), ep.support_y)
        gs = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
        fast = {n: p - 0.2 * gr for (n, p), gr in zip(params.items(), gs)}
        q = F.cross_entropy(functional_forward(model, fast, ep.query_x), ep.query_y) / 4
        for t, gr in zip(total, torch.autograd.grad(q, tuple(params.values()))):
            t += gr
    for a, b in zip(par, total):
        torch.testing.assert_close(a, b)


def test_parallel_evaluate_gives_the_same_accuracies():
    from npbml.evaluate import evaluate
    from tasks.dataset import TensorClassDataset
    from tasks.sampler import TaskSampler

    torch.manual_seed(0)
    images = (torch.rand(30, 1, 16, 16) * 255).to(torch.uint8)
    data = TensorClassDataset(images, [list(range(5 * c, 5 * c + 5)) for c in range(6)])
    sampler = TaskSampler(data, ways=3, shots=1, queries=2, seed=3)
    learner = MAML(Conv4(hidden=4, image_size=16, num_classes=3), inner_lr=0.5, inner_steps=2)
    one = evaluate(learner, sampler, 11)
    # Each episode's accuracy is a multiple of 1/6; the mean over 11 is order-free, so check the
    # per-episode values too (parallel_map keeps item order, tested above).
    per_task = [learner.evaluate(sampler.sample(i))["accuracy"] for i in range(11)]
    assert one["accuracy"] == pytest.approx(sum(per_task) / 11)
    for workers in (2, 3):
        assert evaluate(learner, sampler, 11, workers=workers) == one
    with pytest.raises(ValueError, match="workers"):
        evaluate(learner, sampler, 2, workers=0)


def test_a_stalled_worker_does_not_hold_back_the_other():
    """Items are claimed one at a time: while one worker is stuck on item 0, the other takes
    every remaining item (a fixed split would leave items 2 and 4 waiting for the stuck one)."""
    items = list(range(6))
    last_done = threading.Event()
    ran_on: dict[int, str] = {}

    def fn(_replica, i):
        ran_on[i] = threading.current_thread().name
        if i == 0:
            last_done.wait(timeout=10)
        if i == len(items) - 1:
            last_done.set()
        return i * i

    out = parallel_map(nn.Linear(2, 2), items, fn, workers=2)
    assert out == [i * i for i in items]
    assert last_done.is_set()
    assert all(ran_on[i] != ran_on[0] for i in items[1:])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_workers_use_the_callers_intra_op_threads():
    """Workers run BLAS/oneDNN with the caller's thread count. A fresh thread's first matmul
    otherwise starts an OpenMP team of all cores: extra threads that oversubscribe the CPU."""
    before_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workers = 5  # a pool size no other test uses, so its threads are new here
        a, b = torch.randn(300, 576), torch.randn(576, 64)
        before = len(os.listdir("/proc/self/task"))
        out = parallel_map(
            nn.Linear(2, 2), list(range(workers)), lambda _r, i: float((a @ b)[0, i]), workers
        )
        after = len(os.listdir("/proc/self/task"))
    finally:
        torch.set_num_threads(before_threads)
    assert out == [float((a @ b)[0, i]) for i in range(workers)]
    assert after - before <= workers  # the pool's own threads and nothing else
