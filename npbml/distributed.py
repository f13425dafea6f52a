"""Data-parallel meta-training across processes and machines (``torchrun``).

``torchrun --nproc_per_node=P -m npbml train --config FILE --out DIR`` (and multi-node runs with
torchrun's ``--nnodes``/``--node_rank``/``--rdzv_endpoint`` flags) starts ``P`` processes per
machine; :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group: ``gloo`` on CPU,
``nccl`` on CUDA with device ``cuda:LOCAL_RANK``. Without that environment (or with
``WORLD_SIZE=1``) nothing is initialised and training runs exactly as a single process.

Data parallelism over the tasks of a meta-batch. The outer objective of MAML-style meta-learning
(Finn et al. 2017, eq. 3; docs/methods/npbml.md) is the mean over the ``B`` tasks of a meta-batch,

    grad L(theta) = (1/B) sum_{k=0}^{B-1} grad L_k(theta),

and the tasks are independent given ``theta``. With ``W`` processes each rank ``r`` computes the
mean over its ``b = B/W`` tasks, ``g_r = (1/b) sum_{k in S_r} grad L_k``, and an all-reduce of the
``g_r`` divided by ``W`` gives ``(1/W) sum_r g_r = (1/B) sum_k grad L_k``: the single-process
meta-gradient up to the order of the floating-point additions. The shards ``S_r`` are contiguous
slices of the *same global task stream* a single process would draw
(:meth:`tasks.sampler.IndexedEpisodes.sample_batch_shard`: episode ``i`` is a pure function of
``(seed, i)``), so a ``W``-process run and a single-process run with the same config see the same
tasks at every step, and a checkpoint of either can be resumed by the other.

The gradients are reduced explicitly (one coalesced ``all_reduce`` per step) rather than through
``DistributedDataParallel``: the learners run functional inner loops (``functional_call`` on
parameter dicts, several forwards per task) and :meth:`meta_backward` calls ``backward`` once per
task, which DDP's per-backward hooks would turn into ``B`` reductions per step.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from npbml.config import ConfigError
from npbml.evaluate import mean_confidence_interval
from tasks.episode import Episode

# torchrun's variables; RANK and WORLD_SIZE decide whether a run is distributed.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# torch modules whose functions take ``group=dist.group.WORLD`` as a default argument. A default
# is evaluated once, at import, so importing one of them while a group exists pins that group's
# Python object for the life of the process: destroy_process_group() then cannot free it, and its
# gloo threads (one transport loop, one per worker) are still running at interpreter exit, where
# tearing them down aborts the process at random ("terminate called without an active exception",
# SIGABRT, issue 16). torch.distributed.nn is imported lazily by torch._dynamo, which the first
# torch.optim optimizer imports, i.e. after the group exists. Imported before the group exists,
# the defaults are ``None`` (the default group at call time) and pin nothing.
WORLD_DEFAULT_MODULES = (
    "torch.distributed.nn",  # functional.py: 10 collectives with group=group.WORLD
    "torch.distributed.optim",  # ZeroRedundancyOptimizer(group=dist.group.WORLD)
    "torch.distributed.fsdp.sharded_grad_scaler",  # ShardedGradScaler(process_group=...)
)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the group: ``rank`` of ``world_size``, its ``device``.

    ``world_size == 1`` is the ordinary single-process run (no process group, no collectives).
    ``owns_group``: the group was created by :func:`init_distributed` (and is destroyed by
    :func:`shutdown`), rather than by the caller.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs and progress bars."""
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when absent)."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """``RANK`` set by torchrun (0 when absent): which process prints the CLI summary."""
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={raw!r} is not an integer; launch with torchrun, which "
            "sets RANK, WORLD_SIZE and LOCAL_RANK, or unset it for a single-process run"
        ) from None


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group when there is one; else the single-process context.

    ``device`` is the run's resolved ``train.device``: CPU ranks use the ``gloo`` backend; CUDA
    ranks use ``nccl`` and device ``cuda:LOCAL_RANK`` (one GPU per process, whatever index the
    config names). A group already initialised by the caller is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        if world == 1:
            return DistContext(device=device)
        local = _env_int("LOCAL_RANK", rank)
        dev = torch.device("cuda", local) if device.type == "cuda" else device
        return DistContext(rank, world, local, dev, dist.get_backend(), owns_group=False)
    world = env_world_size()
    if world <= 1:
        return DistContext(device=device)
    if not dist.is_available():
        raise ConfigError(
            f"WORLD_SIZE={world} asks for a distributed run, but this torch build has no "
            "torch.distributed; run a single process instead"
        )
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; launch with "
            "`torchrun --nproc_per_node=N -m npbml train ...`, which sets all of them"
        )
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} has no GPU (this machine has {torch.cuda.device_count()}); "
                "use --nproc_per_node <= the number of GPUs, or train.device=cpu"
            )
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = device, "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://"}
    if backend == "nccl":
        kwargs["device_id"] = dev  # binds the communicator to this rank's GPU (barriers too)
    import_world_default_modules()
    dist.init_process_group(**kwargs)
    return DistContext(rank, world, local, dev, backend, owns_group=True)


def import_world_default_modules() -> None:
    """Import :data:`WORLD_DEFAULT_MODULES` while no process group exists (see there).

    Call it before ``dist.init_process_group`` wherever a group is created (:func:`init_distributed`
    does); afterwards it is too late: a module imported while the group exists keeps it alive.
    """
    if dist.is_available() and dist.is_initialized():
        return  # importing now would pin the existing group
    for name in WORLD_DEFAULT_MODULES:
        # A torch build without one of them cannot pin anything with it either.
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def shutdown(ctx: DistContext) -> None:
    """Wait for every rank, then destroy the group if :func:`init_distributed` created it."""
    if ctx.distributed and dist.is_initialized():
        barrier(ctx)
        if ctx.owns_group:
            dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def local_batch_size(meta_batch_size: int, world_size: int) -> int:
    """Tasks per rank ``B / W``; a clear error when ``W`` does not divide ``B``.

    An uneven split would weight the ranks' task means unequally in the average of
    :func:`all_reduce_gradients` (or need per-rank weights), so it is refused.
    """
    if meta_batch_size % world_size:
        lo = (meta_batch_size // world_size) * world_size
        hint = f"{lo} or {lo + world_size}" if lo else f"{world_size}"
        raise ConfigError(
            f"train.meta_batch_size={meta_batch_size} is not divisible by the number of "
            f"processes (WORLD_SIZE={world_size}); each process takes an equal share of the "
            f"meta-batch: set --set train.meta_batch_size={hint}, or launch a number of "
            f"processes that divides {meta_batch_size}"
        )
    return meta_batch_size // world_size


def sample_shard(sampler: Any, meta_batch_size: int, ctx: DistContext) -> Episode:
    """This rank's share of the next meta-batch of ``sampler`` (the whole batch on one process).

    All ranks advance the sampler by the whole ``meta_batch_size``, so its state stays the same
    on every rank (and equal to a single-process run's).
    """
    if not ctx.distributed:
        return sampler.sample_batch(meta_batch_size)
    if not hasattr(sampler, "sample_batch_shard"):
        raise ConfigError(
            f"the train task source {type(sampler).__name__} cannot split a meta-batch across "
            "processes (it has no sample_batch_shard); derive it from "
            "tasks.sampler.IndexedEpisodes or train with a single process"
        )
    return sampler.sample_batch_shard(meta_batch_size, ctx.rank, ctx.world_size)


def broadcast_module(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place).

    Every rank builds the learner from the same seed, so this is normally a no-op; it makes the
    ranks' starting points identical even where initialisation is not deterministic.
    """
    if not ctx.distributed:
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            if torch.is_tensor(t):
                dist.broadcast(t, src=0)


def all_reduce_gradients(params: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Average ``p.grad`` over the ranks in place, in one coalesced all-reduce.

    Each rank's gradient is the mean over its ``B/W`` tasks, so the average over the ``W`` ranks is
    the mean over all ``B`` tasks (module docstring). A parameter whose gradient is ``None`` on
    every rank stays ``None`` (as in a single process, where optimizers skip it); ``None`` on some
    ranks only counts as zeros there.
    """
    if not ctx.distributed:
        return
    params = list(params)
    ref = next((p.grad for p in params if p.grad is not None), None)
    dtype = ref.dtype if ref is not None else params[0].dtype
    dev = params[0].device
    flats = [
        (p.grad if p.grad is not None else torch.zeros_like(p, dtype=dtype)).reshape(-1).to(dtype)
        for p in params
    ]
    present = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=dev)
    buf = torch.cat([*flats, present])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= ctx.world_size
    counts = buf[-len(params) :]
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if float(counts[i]) > 0:
            g = buf[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n


def all_reduce_metrics(
    loss: float, accuracy: float | None, finite: bool, ctx: DistContext
) -> tuple[float, float | None, bool]:
    """Mean meta-loss and accuracy over the ranks (equal shares, so the means over all ``B``
    tasks) and whether every rank's step was finite, so that all ranks take the same skip
    decision. Single process: returned unchanged."""
    if not ctx.distributed:
        return loss, accuracy, finite
    has_acc = accuracy is not None
    # A NaN or inf loss on any rank makes the sum, hence the mean, non-finite, as in one process.
    v = torch.tensor(
        [loss, accuracy if has_acc else 0.0, float(not finite)],
        dtype=torch.float64,
        device=ctx.device,
    )
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    mean_loss = float(v[0]) / ctx.world_size
    return mean_loss, (float(v[1]) / ctx.world_size if has_acc else None), float(v[2]) == 0.0


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's ``flag`` on every rank (wall-clock decisions such as ``max_seconds``)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(int(t))


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's picklable ``obj`` on every rank (others pass anything, e.g. ``None``)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """Seed of the global RNGs of rank ``rank > 0`` (rank 0 keeps ``seed``, so its stream is a
    single-process run's): a numpy SeedSequence of ``(seed, rank)``, independent across ranks."""
    state = np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def evaluate_sharded(
    learner: Any, sampler: Any, num_tasks: int, ctx: DistContext, device: torch.device
) -> dict[str, Any]:
    """:func:`npbml.evaluate.evaluate` with the episodes split across the ranks.

    Rank ``r`` adapts to episodes ``r, r + W, ...`` of ``0 .. num_tasks-1``; the per-task
    accuracies are gathered back into episode order, so the mean and 95% interval are exactly a
    single process's (docs/methods/protocol.md), on every rank.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    mine = range(ctx.rank, num_tasks, ctx.world_size)
    accs = [float(learner.evaluate(sampler.sample(i).to(device))["accuracy"]) for i in mine]
    per_rank = (num_tasks + ctx.world_size - 1) // ctx.world_size
    buf = torch.full((per_rank,), float("nan"), dtype=torch.float64, device=ctx.device)
    buf[: len(accs)] = torch.tensor(accs, dtype=torch.float64)
    gathered = [torch.empty_like(buf) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, buf)
    # Column j of rank r is episode r + j*W: interleave the ranks back into episode order.
    table = torch.stack(gathered).T.reshape(-1)[:num_tasks].cpu().numpy()
    mean, h = mean_confidence_interval(table)
    return {"accuracy": mean, "ci95": h, "tasks": int(num_tasks)}


def sync_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Make the module's buffers equal on every rank: floating-point ones (BatchNorm running
    statistics with ``track_running_stats=True``) averaged over the ranks, the others (counters)
    rank 0's. Each rank updates such statistics from its own tasks only, so they drift apart
    between calls; training-mode forwards do not read them, evaluation and checkpoints do."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for b in module.buffers():
            if b.is_floating_point():
                dist.all_reduce(b, op=dist.ReduceOp.SUM)
                b /= ctx.world_size
            else:
                dist.broadcast(b, src=0)
