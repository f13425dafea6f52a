"""The one interface the meta-training loop sees for multi-process concerns.

:func:`process_group` turns the :class:`~npbml.distributed.DistContext` of a run into a
:class:`SingleProcess` (no torchrun: every method is the identity or does nothing) or a
:class:`TorchrunGroup` (the collectives of :mod:`npbml.distributed`). The loop calls the same
methods either way, so it reads the same with or without torchrun.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import nn

from npbml.checkpoint import rng_state
from npbml.distributed import (
    DistContext,
    all_gather_object,
    all_reduce_gradients,
    all_reduce_metrics,
    barrier,
    broadcast_flag,
    broadcast_module,
    broadcast_object,
    evaluate_sharded,
    sample_shard,
    sync_buffers,
)
from npbml.evaluate import Evaluable, evaluate
from tasks.episode import Episode

__all__ = ["SingleProcess", "StepStats", "TorchrunGroup", "grad_norm", "process_group"]


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients (NaN/inf if any entry is); torch >= 2.2 compatible.

    Args:
        params: Parameters whose ``grad`` (where present) enters the norm.

    Returns:
        A 0-dim tensor (zero when no parameter has a gradient).
    """
    norms = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@dataclass(frozen=True)
class StepStats:
    """What one meta-step computed before the optimizer step.

    ``loss``/``accuracy``: the values logged (floats or 0-dim tensors, None when the learner
    reports none); ``meta_loss``: the loss checked for finiteness; ``norm``: the meta-gradient
    norm; ``finite``: whether both are finite (the step is taken).
    """

    loss: Any
    accuracy: Any
    meta_loss: Any
    norm: torch.Tensor
    finite: bool


class SingleProcess:
    """One process (no torchrun): nothing to reduce, broadcast or wait for.

    Args:
        ctx: The single-process context (``world_size == 1``).
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def is_main(self) -> bool:
        """The process that writes files, logs and progress bars."""
        return self.ctx.is_main

    def sample(self, sampler: Any, meta_batch_size: int) -> Episode:
        """This process's share of the next meta-batch (here: all of it)."""
        return sampler.sample_batch(meta_batch_size)

    def broadcast_module(self, module: nn.Module) -> None:
        """Make every process start from the main process's parameters (no-op here)."""

    def reduce_gradients(self, params: Sequence[torch.Tensor], stats: StepStats) -> StepStats:
        """Average the meta-gradients and step statistics over the processes (identity here)."""
        return stats

    def decide(self, flag: bool) -> bool:
        """The main process's decision, on every process (wall-clock stops)."""
        return flag

    def broadcast(self, obj: Any) -> Any:
        """The main process's picklable ``obj`` on every process."""
        return obj

    def rng_states(self) -> list[dict[str, Any]] | None:
        """Every process's RNG states for a checkpoint (None: the checkpoint's own suffice)."""
        return None

    def sync_buffers(self, module: nn.Module) -> None:
        """Make buffers (BatchNorm statistics) equal across processes (no-op here)."""

    def evaluate(
        self, learner: nn.Module, sampler: Any, tasks: int, device: torch.device, workers: int
    ) -> dict[str, Any]:
        """Mean validation accuracy and 95% interval over ``tasks`` episodes of ``sampler``."""
        # Every learner of npbml.algorithms has evaluate(episode) (the Evaluable protocol).
        return evaluate(cast(Evaluable, learner), sampler, tasks, device=device, workers=workers)

    def barrier(self) -> None:
        """Wait for every process (no-op here)."""


class TorchrunGroup(SingleProcess):
    """A data-parallel run under torchrun: the collectives of :mod:`npbml.distributed`."""

    def sample(self, sampler: Any, meta_batch_size: int) -> Episode:
        return sample_shard(sampler, meta_batch_size, self.ctx)

    def broadcast_module(self, module: nn.Module) -> None:
        broadcast_module(module, self.ctx)

    def reduce_gradients(self, params: Sequence[torch.Tensor], stats: StepStats) -> StepStats:
        # Mean over the ranks' equal shares = mean over the B tasks; the skip decision must be
        # the same on every rank, or the ranks fall out of step.
        all_reduce_gradients(params, self.ctx)
        acc = None if stats.accuracy is None else float(stats.accuracy)
        loss, acc, finite = all_reduce_metrics(float(stats.meta_loss), acc, stats.finite, self.ctx)
        norm = grad_norm(params)
        finite = finite and bool(torch.isfinite(norm))
        return replace(stats, loss=loss, accuracy=acc, meta_loss=loss, norm=norm, finite=finite)

    def decide(self, flag: bool) -> bool:
        return broadcast_flag(flag, self.ctx)

    def broadcast(self, obj: Any) -> Any:
        return broadcast_object(obj, self.ctx)

    def rng_states(self) -> list[dict[str, Any]] | None:
        return all_gather_object(rng_state(), self.ctx)

    def sync_buffers(self, module: nn.Module) -> None:
        sync_buffers(module, self.ctx)

    def evaluate(
        self, learner: nn.Module, sampler: Any, tasks: int, device: torch.device, workers: int
    ) -> dict[str, Any]:
        # Floating-point buffers averaged first, so every rank evaluates the same model.
        sync_buffers(learner, self.ctx)
        return evaluate_sharded(learner, sampler, tasks, self.ctx, device)

    def barrier(self) -> None:
        barrier(self.ctx)


def process_group(ctx: DistContext) -> SingleProcess:
    """The interface for ``ctx``: :class:`TorchrunGroup` when distributed, else
    :class:`SingleProcess`.

    Args:
        ctx: The context from :func:`npbml.distributed.init_distributed`.

    Returns:
        The process-group object the training loop uses.
    """
    return TorchrunGroup(ctx) if ctx.distributed else SingleProcess(ctx)
