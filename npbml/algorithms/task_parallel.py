"""Task-parallel meta-gradients: the tasks of a meta-batch on several CPU threads.

The meta-gradient of a meta-batch is a sum of independent per-task terms (Finn et al. 2017,
Algorithm 2, line 10), so the tasks can run concurrently. On a CPU the per-task work of few-shot
networks (a few small convolutions on 5-100 images) parallelises poorly *inside* an operator
(intra-op threads synchronise at every op); running whole tasks on separate threads, each op on
one thread, keeps every core busy instead. Kernels release the GIL; the Python-level work of a
task does not, so the gain is the conv/BN share of the step.

Thread safety: :func:`torch.func.functional_call` substitutes tensors into the module's
attributes for the duration of a call, so two threads must not run it on the same module
objects. Each worker therefore gets a *replica* of the learner (:func:`replicate`): new module
objects whose ``_parameters`` dicts hold the very same ``nn.Parameter`` objects (no copies of
the weights, no per-task copies, nothing to synchronise afterwards). Buffers are shared too, so a
model that updates BatchNorm running statistics in training mode updates them from several threads
(their final value then depends on thread timing; the meta-gradient does not).

Determinism: each worker returns its tasks' gradients; they are added to ``.grad`` in task order,
the same float operations in the same order as the sequential per-task backward, so the result is
bit-identical to ``workers=1`` -- for models whose forward draws no random numbers: dropout in a
worker thread takes the global generator's numbers in thread-timing order.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

__all__ = ["TaskResult", "parallel_map", "parallel_task_gradients", "replicate"]

# (per-task gradients or None for unused parameters, task loss, task accuracy)
TaskResult = tuple[list[torch.Tensor | None], float, float]


def replicate(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A structural copy of ``module`` that shares every Parameter and buffer object.

    Submodules are new objects (so ``functional_call`` on the replica never touches the
    original's attributes); a submodule registered under two names stays one object in the
    replica. Plain attributes are copied shallowly (``copy.copy``).
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    rep = copy.copy(module)
    memo[id(module)] = rep
    rep._parameters = dict(module._parameters)
    rep._buffers = dict(module._buffers)
    rep._modules = {
        k: (None if m is None else replicate(m, memo)) for k, m in module._modules.items()
    }
    return rep


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}
_EXECUTORS_LOCK = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads (created once, reused by every learner)."""
    with _EXECUTORS_LOCK:
        if workers not in _EXECUTORS:
            _EXECUTORS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="npbml-task")
        return _EXECUTORS[workers]


def parallel_map(
    learner: nn.Module,
    items: Sequence[Any],
    fn: Callable[[nn.Module, Any], Any],
    workers: int,
) -> list[Any]:
    """``[fn(replica, item) for item in items]`` on ``workers`` threads, in item order.

    Every worker uses the caller's intra-op thread count (``torch.get_num_threads()``; set it to
    1 for ``workers`` = number of cores). Each worker runs on its own replica of ``learner``
    (:func:`replicate`, rebuilt on every call so that it sees the learner's current plain
    attributes, e.g. ``first_order`` switched between calls) and takes the next unclaimed item
    whenever it finishes one, so a worker that the OS slows down does not leave the other idle
    at the end of the meta-batch. Results are returned in item order whichever worker computed
    them.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    replicas = [replicate(learner) for _ in range(min(workers, len(items)))]
    claim = itertools.count()  # each item index is claimed by exactly one worker
    lock = threading.Lock()
    threads = torch.get_num_threads()

    def run(w: int) -> list[tuple[int, Any]]:
        # Otherwise a new thread's first BLAS/oneDNN call starts an OpenMP team of all cores
        # (torch sets the thread count lazily, after it): 2 workers x 2 threads on 2 cores, and
        # the teams stay. Measured here, multi-threaded ops on the caller's thread then ran ~40%
        # slower too (learn2learn at 2 threads: 0.95 -> 1.33 s per meta-step).
        torch.set_num_threads(threads)
        done: list[tuple[int, Any]] = []
        while True:
            with lock:
                i = next(claim)
            if i >= len(items):
                return done
            done.append((i, fn(replicas[w], items[i])))

    pool = _executor(workers)
    results: dict[int, Any] = {}
    for f in [pool.submit(run, w) for w in range(len(replicas))]:
        results.update(f.result())
    return [results[i] for i in range(len(items))]


def parallel_task_gradients(
    learner: nn.Module,
    tasks: Sequence[Any],
    params: Sequence[torch.Tensor],
    task_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, float]],
    workers: int,
    divisor: int = 1,
) -> list[TaskResult]:
    """Run ``task_fn(replica, task) -> (loss, accuracy)`` for every task on ``workers`` threads
    and return, in task order, ``d (loss / divisor) / d params`` (None where unused), the loss
    and the accuracy. Only one task graph per worker is alive at a time.
    """
    params = tuple(params)

    def one(replica: nn.Module, task: Any) -> TaskResult:
        loss, acc = task_fn(replica, task)
        grads = torch.autograd.grad(loss / divisor, params, allow_unused=True)
        return list(grads), float(loss.detach()), acc

    return parallel_map(learner, tasks, one, workers)
