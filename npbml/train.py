"""Meta-training loop: outer optimisation, validation, checkpoints, metrics and exact resume.

One outer step (Finn et al. 2017, arXiv 1703.03400; the protocol of docs/methods/protocol.md,
the NPBML learner of docs/methods/npbml.md): draw a meta-batch of ``B`` tasks, let the learner
compute the meta-loss ``(1/B) sum_i L(Q_i; theta_i')`` of its adapted parameters, and take an
optimizer step on the meta-parameters (Adam by default, Finn et al. 2017).

The loop (:func:`train`): a :class:`TrainState` (learner, optimizer, schedule, samplers, step,
best validation accuracy, the open log interval) advanced by :func:`meta_step` and checked by
:func:`validate`; the files go through a :class:`~npbml.run_dir.RunDir`, and multi-process
concerns through the one interface of :mod:`npbml.parallel`, so the loop reads the same with or
without torchrun.

Run directory ``DIR``:

- ``config.yaml``: the validated config of the run;
- ``metrics.jsonl``: one JSON object per line, ``{"step", "split": "train", "loss", "accuracy",
  "lr", ...}`` every ``log_every`` steps and ``{"step", "split": "validation", "accuracy",
  "ci95", "tasks", "best"}`` every ``val_every`` steps;
- ``last.pt``: the latest state, every ``checkpoint_every`` steps and at the end;
- ``best.pt``: the state at the best validation accuracy so far (the latest state while no
  validation has run yet).

Exact resume: a checkpoint holds the learner, optimizer and scheduler states, the samplers'
episode counters (episode ``i`` is a pure function of ``(seed, i)``), every global RNG state and
the best validation accuracy; ``metrics.jsonl`` is cut back to the checkpoint's step. A run killed
at any point and resumed from ``last.pt`` ends with bit-identical parameters and the same metric
lines (up to the wall-clock fields :data:`TIMING_KEYS`) as an uninterrupted run on the same CPU
with the same number of threads (``train.threads``).

Multi-process runs (``torchrun --nproc_per_node=P -m npbml train ...``, see
:mod:`npbml.distributed`): each of the ``W`` ranks computes the meta-gradient of its ``B/W``
tasks of the meta-batch (a contiguous slice of the single-process task stream), the gradients
and train metrics are averaged across ranks before the step, validation episodes are split
across ranks (floating-point buffers such as BatchNorm running statistics are averaged across
ranks first), and rank 0 alone writes the run directory. A checkpoint also holds every rank's RNG
states; it resumes with any number of processes that divides ``B`` (the task stream does not
depend on it). Without torchrun's environment none of this runs: a single process is unchanged.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from npbml.checkpoint import CheckpointError, load_checkpoint, rng_state, set_rng_state
from npbml.config import Config, ConfigError, config_from_dict
from npbml.distributed import DistContext, init_distributed, local_batch_size, rank_seed, shutdown
from npbml.parallel import SingleProcess, StepStats, grad_norm, process_group
from npbml.run_dir import RunDir, read_metrics
from tasks.benchmarks import TaskSets, get_tasksets
from tasks.errors import TaskDataError

CHECKPOINT_FORMAT = "npbml-checkpoint"
CHECKPOINT_VERSION = 1
# Wall-clock dependent fields of metrics.jsonl lines (everything else is deterministic).
TIMING_KEYS = ("tasks_per_s", "time_s", "eval_s")
# Config keys that may change between a run and its resumption without breaking it.
RESUMABLE_CHANGES = {
    "data.root",
    "train.checkpoint_every",
    "train.device",
    "train.threads",
    "train.task_workers",
    "train.channels_last",
    "train.log_every",
    "eval.tasks",
    "eval.split",
}

__all__ = [
    "TIMING_KEYS",
    "TrainResult",
    "TrainState",
    "build_learner",
    "infer_model_kwargs",
    "load_learner",
    "make_tasksets",
    "meta_step",
    "read_metrics",
    "resolve_checkpoint",
    "resolve_device",
    "seed_everything",
    "train",
    "validate",
]

# cb(step, records): the metrics.jsonl records written at that step (possibly none).
StepCallback = Callable[[int, list[dict[str, Any]]], None]


class _MetaTrainable(Protocol):
    """What :func:`meta_step` calls on a learner (npbml.algorithms.GradientLearner has both)."""

    def outer_loss(self, episode: Any) -> tuple[torch.Tensor, dict[str, Any]]: ...

    def meta_backward(self, episode: Any, workers: int | None = None) -> dict[str, Any]: ...


@dataclass
class TrainResult:
    """Outcome of :func:`train`: where it wrote, how far it got, its best validation accuracy.

    ``learner`` holds the final parameters (``out_dir/best.pt`` the best-validation ones);
    ``finished`` is False when the run was paused before ``meta_steps``. ``rank`` /
    ``world_size``: this process's place in a multi-process run (0 / 1 for a single process).
    ``new_steps``: the steps this call took (0 when the run was already finished, or already
    at ``max_steps``).
    """

    out_dir: Path
    step: int
    best_val_accuracy: float | None
    learner: nn.Module
    config: Config
    finished: bool
    rank: int = 0
    world_size: int = 1
    new_steps: int = 0


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"train.device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'cpu'")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_tasksets(config: Config, root: str | None = None) -> TaskSets:
    """The train/validation/test samplers of ``config.data`` (seeded by ``config.train.seed``).

    ``root`` overrides ``config.data.root``. Bad options surface as :class:`ConfigError`;
    missing or corrupt files as the data layer's :class:`tasks.errors.TaskDataError`.
    """
    d = config.data
    try:
        return get_tasksets(
            d.name,
            root if root is not None else d.root,
            ways=d.ways,
            shots=d.shots,
            queries=d.queries,
            seed=config.train.seed,
            test_queries=d.test_queries,
            **d.options,
        )
    except TaskDataError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data ({d.name}): {e}") from e


def infer_model_kwargs(config: Config, tasksets: TaskSets) -> dict[str, Any]:
    """``num_classes`` from the ways, ``in_channels``/``image_size`` from one episode's images."""
    x = tasksets.train.sample(0).support_x  # by index: the sampler's stream is untouched
    kwargs: dict[str, Any] = {"num_classes": config.data.ways}
    if x.dim() == 4:
        kwargs["in_channels"] = int(x.shape[1])
        kwargs["image_size"] = int(x.shape[-1])
    return kwargs


def build_learner(config: Config, model_kwargs: dict[str, Any]) -> nn.Module:
    """Backbone from ``config.model`` and meta-learner from ``config.algorithm`` around it."""
    from npbml.algorithms import build_algorithm
    from npbml.models import build_model

    try:
        model = build_model(config.model.name, **{**model_kwargs, **config.model.options})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model ({config.model.name}): {e}") from e
    a = config.algorithm
    try:
        learner = build_algorithm(
            a.name,
            model,
            inner_lr=a.inner_lr,
            inner_steps=a.inner_steps,
            eval_inner_steps=(
                a.eval_inner_steps if a.eval_inner_steps is not None else a.inner_steps
            ),
            first_order=a.first_order,
            **a.options,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"algorithm ({a.name}): {e}") from e
    if config.train.channels_last:
        if not hasattr(learner, "channels_last"):
            raise ConfigError(
                f"train.channels_last: algorithm {a.name!r} has no channels-last mode; "
                "set train.channels_last: false"
            )
        learner.channels_last = True
    return learner


def _meta_parameters(learner: nn.Module) -> list[torch.nn.Parameter]:
    meta_parameters = getattr(learner, "meta_parameters", None)
    params = meta_parameters() if meta_parameters is not None else None
    params = list(params if params is not None else learner.parameters())
    if not params:
        raise ValueError("the learner has no meta-parameters to optimise")
    return params


def make_optimizer(config: Config, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = config.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.meta_lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.meta_lr, weight_decay=t.weight_decay)


def make_scheduler(
    config: Config, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    t = config.train
    if t.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=t.meta_steps, eta_min=t.min_lr
        )
    return None


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _check_format(state: dict[str, Any], path: Path) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an npbml training checkpoint")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} was written by a newer npbml (checkpoint version "
            f"{state['version']} > {CHECKPOINT_VERSION}); upgrade npbml to read it"
        )


def _check_resumable(saved: Config, config: Config, run: RunDir) -> None:
    """Refuse a changed config, except the keys of :data:`RESUMABLE_CHANGES` and a new length
    of a constant-rate run (extending or shortening it is well defined)."""
    run.check_resumable(
        saved.to_dict(),
        config.to_dict(),
        ignore=RESUMABLE_CHANGES,
        tolerate=lambda changed: (
            changed == ["train.meta_steps"] and config.train.lr_schedule == "none"
        ),
    )


def resolve_checkpoint(path: str | Path, name: str = "best.pt") -> Path:
    """A checkpoint file: ``path`` itself, or ``path/name`` for a run directory."""
    p = Path(path)
    if p.is_dir():
        f = p / name
        if not f.is_file():
            present = sorted(x.name for x in p.glob("*.pt"))
            hint = f" (it has: {', '.join(present)})" if present else " (no .pt files in it)"
            raise CheckpointError(f"run directory {str(p)!r} has no {name}{hint}")
        return f
    if not p.exists():
        raise CheckpointError(
            f"checkpoint {str(p)!r} not found; pass a run directory or a .pt file"
        )
    return p


def load_learner(
    path: str | Path, device: str | torch.device = "cpu", name: str = "best.pt"
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild the learner saved in a checkpoint (or run directory); no dataset is needed.

    Returns ``(learner, config, state)``.
    """
    ckpt = resolve_checkpoint(path, name)
    state = load_checkpoint(ckpt)
    _check_format(state, ckpt)
    config = config_from_dict(state["config"])
    learner = build_learner(config, state["model_kwargs"])
    learner.load_state_dict(state["learner"])
    return learner.to(device), config, state


# ---------------------------------------------------------------------------------------------
# Training state
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything a meta-training run carries from step to step (and into its checkpoints).

    ``log_sums`` / ``log_count``: the train metrics of the steps since the last log line, kept in
    checkpoints so that the first line after a resume averages the same steps as an
    uninterrupted run; ``nonfinite_streak``: consecutive skipped (non-finite) steps.
    """

    config: Config
    model_kwargs: dict[str, Any]
    learner: nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tasksets: TaskSets
    step: int = 0
    best: float | None = None
    nonfinite_streak: int = 0
    log_sums: dict[str, Any] = field(default_factory=dict)
    log_count: int = 0

    def state_dict(self, rng_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The checkpoint of this state (with every rank's RNG states in a multi-process run).

        Args:
            rng_ranks: The RNG states of all ranks, in rank order, or None for one process.

        Returns:
            A ``weights_only``-loadable checkpoint dict.
        """
        ts = self.tasksets
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "config": self.config.to_dict(),
            "model_kwargs": dict(self.model_kwargs),
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "samplers": {
                "train": ts.train.state_dict(),
                "validation": ts.validation.state_dict(),
                "test": ts.test.state_dict(),
            },
            "rng": rng_state(),
            "best_val_accuracy": self.best,
            "log_accumulator": {
                "sums": {k: float(v) for k, v in self.log_sums.items()},
                "n": self.log_count,
            },
            "nonfinite_streak": self.nonfinite_streak,
        }
        if rng_ranks is not None:
            state.update(world_size=len(rng_ranks), rng_ranks=rng_ranks)
        return state

    def load_state_dict(self, state: dict[str, Any], group: SingleProcess) -> None:
        """Continue from checkpoint ``state`` (a resume with another number of processes gives
        the ranks other than 0 fresh RNG streams).

        Args:
            state: A checkpoint written from :meth:`state_dict`.
            group: This process's place in the run.
        """
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for split in ("train", "validation", "test"):
            getattr(self.tasksets, split).load_state_dict(state["samplers"][split])
        self.step, self.best = int(state["step"]), state["best_val_accuracy"]
        per_rank = state.get("rng_ranks")
        if per_rank is not None and len(per_rank) == group.world_size:
            set_rng_state(per_rank[group.rank])
        elif group.rank == 0:
            set_rng_state(state["rng"])
        else:
            seed_everything(rank_seed(self.config.train.seed * 1_000_003 + self.step, group.rank))
        acc = state.get("log_accumulator") or {"sums": {}, "n": 0}
        self.log_sums, self.log_count = dict(acc["sums"]), int(acc["n"])
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))


@dataclass
class _Clock:
    """Wall-clock bookkeeping of the throughput fields (not checkpointed: they are timing)."""

    start: float
    last_log: float
    tasks: int = 0


def _save(state: TrainState, run: RunDir, group: SingleProcess, best: bool = False) -> None:
    """Write ``last.pt`` (or ``best.pt``); collective: every rank calls it at the same steps."""
    group.sync_buffers(state.learner)
    rngs = group.rng_states()
    if run.writer:
        (run.save_best if best else run.save_last)(state.state_dict(rngs))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(
    config: Config,
    out_dir: str | Path,
    resume: bool = True,
    *,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    callbacks: Sequence[StepCallback] = (),
    stop_when: Callable[[int], bool] | None = None,
    tasksets: TaskSets | None = None,
    progress: bool = True,
) -> TrainResult:
    """Meta-train ``config`` into run directory ``out_dir``; see the module docstring.

    ``resume``: continue from ``out_dir/last.pt`` when it exists (else start over, overwriting the
    run's files). ``max_steps`` / ``max_seconds`` pause the run early (after the step that reaches
    the limit), writing ``last.pt`` so that a later call continues it; ``max_steps`` counts the
    run's steps in total, so a run resumed at or past it takes no step; so does ``stop_when(step)``
    returning True. ``callbacks`` are called as ``cb(step, records)`` after every step, once that
    step's files are written, with the metric records of that step; an exception raised there
    aborts the run as a crash would. ``tasksets``: samplers already built by
    :func:`make_tasksets` for this config (saves building them again).

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls this with the same arguments;
    they form one data-parallel run (module docstring). ``callbacks`` then run on every rank with
    the same records (up to timing fields); ``stop_when`` and ``max_seconds`` are decided on
    rank 0. A meta-batch size not divisible by the number of processes is a :class:`ConfigError`.
    """
    out = Path(out_dir)
    t = config.train
    device = resolve_device(t.device)
    threads_before = torch.get_num_threads()
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    ctx: DistContext | None = None
    ok = False
    try:
        ctx = init_distributed(device)
        local_batch_size(t.meta_batch_size, ctx.world_size)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
        limits = _Limits(max_steps, max_seconds, stop_when)
        result = _train(
            config, out, resume, limits, callbacks, tasksets, progress, process_group(ctx)
        )
        ok = True
        return result
    finally:
        torch.set_num_threads(threads_before)
        if ctx is not None and ctx.owns_group:
            # After an error the other ranks may be stuck in a collective: no final barrier then
            # (torchrun stops the group when a process exits with an error).
            if ok:
                shutdown(ctx)
            else:
                torch.distributed.destroy_process_group()


@dataclass(frozen=True)
class _Limits:
    """When to pause a run before ``train.meta_steps`` (see :func:`train`)."""

    max_steps: int | None = None
    max_seconds: float | None = None
    stop_when: Callable[[int], bool] | None = None

    def reached(self, step: int, elapsed: float, group: SingleProcess) -> bool:
        """Whether to pause after ``step``; wall-clock decisions are the main process's."""
        stop = (
            (self.max_steps is not None and step >= self.max_steps)
            or (self.max_seconds is not None and elapsed >= self.max_seconds)
            or (self.stop_when is not None and bool(self.stop_when(step)))
        )
        if self.max_seconds is not None or self.stop_when is not None:
            stop = group.decide(stop)
        return stop


def _read_resume_state(
    config: Config, run: RunDir, resume: bool, device: torch.device, group: SingleProcess
) -> dict[str, Any] | None:
    """The checkpoint to resume from (``None``: start over). The main process reads and checks
    it and sends it to the others (no shared file system needed), or sends its error, which
    every rank then raises, so that no rank is left waiting in a collective."""
    payload: Any = None
    error: BaseException | None = None
    if group.is_main:
        try:
            if resume and run.has_last():
                where = device if group.world_size == 1 else "cpu"
                state = run.load_last(map_location=where)
                _check_format(state, run.last_path)
                _check_resumable(config_from_dict(state["config"]), config, run)
                payload = ("state", state)
            else:
                payload = ("fresh", None)
        except (CheckpointError, ConfigError) as e:
            error, payload = e, ("error", type(e).__name__, str(e))
    payload = group.broadcast(payload)
    if payload[0] == "error":
        if error is not None:
            raise error
        raise (CheckpointError if payload[1] == "CheckpointError" else ConfigError)(payload[2])
    return payload[1]


def _setup(
    config: Config,
    run: RunDir,
    resume: bool,
    tasksets: TaskSets | None,
    group: SingleProcess,
) -> TrainState:
    """Build the learner, optimizer and samplers; resume from ``last.pt`` or start over."""
    t = config.train
    seed_everything(t.seed)
    if tasksets is None:
        tasksets = make_tasksets(config)
    model_kwargs = infer_model_kwargs(config, tasksets)
    learner = build_learner(config, model_kwargs).to(group.device)
    group.broadcast_module(learner)
    if group.rank > 0:
        # Global RNGs (dropout, augmentation) independent across ranks; rank 0 keeps the
        # single-process stream.
        seed_everything(rank_seed(t.seed, group.rank))
    params = _meta_parameters(learner)
    optimizer = make_optimizer(config, params)
    scheduler = make_scheduler(config, optimizer)
    state = TrainState(config, model_kwargs, learner, params, optimizer, scheduler, tasksets)
    saved = _read_resume_state(config, run, resume, group.device, group)
    if saved is not None:
        state.load_state_dict(saved, group)
        run.truncate_metrics(state.step)
    else:
        run.start_fresh()
    del saved
    run.save_config(config.to_dict())
    return state


def _train(
    config: Config,
    out: Path,
    resume: bool,
    limits: _Limits,
    callbacks: Sequence[StepCallback],
    tasksets: TaskSets | None,
    progress: bool,
    group: SingleProcess,
) -> TrainResult:
    t = config.train
    run = RunDir(out, writer=group.is_main)
    state = _setup(config, run, resume, tasksets, group)
    bar = _progress_bar(state, progress and group.is_main)
    start_step, now = state.step, time.perf_counter()
    clock = _Clock(now, now)
    try:
        while state.step < t.meta_steps:
            if limits.max_steps is not None and state.step >= limits.max_steps:
                break  # resumed at or past max_steps: a total, so no new step
            meta_step(state, group, run)
            clock.tasks += t.meta_batch_size
            records = []
            if state.step % t.log_every == 0 or state.step == t.meta_steps:
                records.append(_log_train(state, run, clock, bar))
            stop = limits.reached(state.step, time.perf_counter() - clock.start, group)
            t_pause = time.perf_counter()
            if state.step % t.val_every == 0 or state.step == t.meta_steps:
                records.append(validate(state, group, run, bar, t_pause))
            if state.step % t.checkpoint_every == 0 or state.step == t.meta_steps or stop:
                _save(state, run, group)
            # Validation and checkpoint time do not count against the training throughput.
            clock.last_log += time.perf_counter() - t_pause
            if bar is not None:
                bar.update(1)
            for cb in callbacks:
                cb(state.step, records)
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
    if state.best is None and state.step > start_step:
        _save(state, run, group, best=True)  # paused before any validation: the latest state
    finished = state.step >= t.meta_steps
    return TrainResult(
        out,
        state.step,
        state.best,
        state.learner,
        config,
        finished,
        group.rank,
        group.world_size,
        new_steps=state.step - start_step,
    )


def _progress_bar(state: TrainState, show: bool) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    total = state.config.train.meta_steps
    return tqdm(total=total, initial=state.step, desc="meta-train", dynamic_ncols=True)


def meta_step(state: TrainState, group: SingleProcess, run: RunDir) -> StepStats:
    """One outer step on the next meta-batch: meta-gradient, reduction across processes, then
    the optimizer step, or a skip when the meta-loss or meta-gradient is not finite.

    Args:
        state: The run's state; ``step`` advances by one, skipped or not.
        group: The processes of the run (reduces the meta-gradient across them).
        run: The run directory (a skipped step is logged there).

    Returns:
        The step's statistics (after reduction).

    Raises:
        FloatingPointError: ``train.max_nonfinite_steps`` steps in a row were skipped.
    """
    t = state.config.train
    learner, params = state.learner, state.params
    learner.train()
    batch = group.sample(state.tasksets.train, t.meta_batch_size)
    if group.device.type != "cpu":
        batch = batch.to(group.device, non_blocking=True)
    state.optimizer.zero_grad(set_to_none=True)
    meta_learner = cast(_MetaTrainable, learner)  # the meta-trained learners all have both
    if t.per_task_backward or t.task_workers > 1:
        info = meta_learner.meta_backward(batch, workers=t.task_workers)
        loss = info.get("loss")
    else:
        loss_t, info = meta_learner.outer_loss(batch)
        loss_t.backward()
        loss = info.get("loss", loss_t.detach())
    # One norm over all meta-gradients (needed for clipping anyway) tells whether any is
    # non-finite; learned losses and preconditioners can diverge (Raymond et al. 2023, arXiv
    # 2301.13247; docs/methods/learned-losses.md).
    norm = grad_norm(params)
    meta_loss = loss if loss is not None else 0.0
    finite = bool(torch.isfinite(norm)) and math.isfinite(float(meta_loss))
    stats = StepStats(loss, info.get("accuracy"), meta_loss, norm, finite)
    stats = group.reduce_gradients(params, stats)
    state.step += 1
    if stats.finite:
        _apply(state, stats)
        # The inner-step safeguard's share of clipped steps (this process's tasks), when the
        # learner has one (NPBML): logged so that a safeguard that acts is seen.
        if "inner_clipped" in info:
            clipped = state.log_sums.get("inner_clipped", 0.0) + float(info["inner_clipped"])
            state.log_sums["inner_clipped"] = clipped
    else:
        _skip(state, stats, run)
    return stats


def _apply(state: TrainState, stats: StepStats) -> None:
    """Clip, step the optimizer and schedule, and add the step's metrics to the log interval."""
    t = state.config.train
    state.nonfinite_streak = 0
    if t.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(state.params, t.grad_clip)
    state.optimizer.step()
    if state.scheduler is not None:
        state.scheduler.step()
    state.log_count += 1
    # Summed as given (floats or 0-dim tensors) and converted once per log interval.
    for k, v in (("loss", stats.loss), ("accuracy", stats.accuracy)):
        if v is not None:
            state.log_sums[k] = state.log_sums.get(k, 0.0) + (
                v.detach() if torch.is_tensor(v) else v
            )


def _skip(state: TrainState, stats: StepStats, run: RunDir) -> None:
    """Drop a non-finite step (logged, warned); too many in a row stop the run."""
    t = state.config.train
    state.nonfinite_streak += 1
    state.optimizer.zero_grad(set_to_none=True)
    meta_loss, norm = float(stats.meta_loss), float(stats.norm)
    # Strings, so that metrics.jsonl stays strict JSON (no NaN/Infinity literals).
    run.append_metrics(
        {
            "step": state.step,
            "split": "train",
            "skipped": "nonfinite",
            "meta_loss": str(meta_loss),
            "grad_norm": str(norm),
        }
    )
    if run.writer:
        warnings.warn(
            f"step {state.step}: non-finite meta-loss ({meta_loss}) or meta-gradient norm "
            f"({norm}); meta-step skipped ({state.nonfinite_streak}/{t.max_nonfinite_steps} in a "
            "row)",
            RuntimeWarning,
            stacklevel=4,
        )
    if state.nonfinite_streak >= t.max_nonfinite_steps:
        raise FloatingPointError(
            f"{state.nonfinite_streak} meta-steps in a row had a non-finite meta-loss or "
            f"meta-gradient (last at step {state.step}); stopped. The last good checkpoint "
            f"{str(run.last_path)!r} is intact. Lower train.meta_lr or "
            "algorithm.inner_lr, or set train.grad_clip, then resume."
        )


def _log_train(state: TrainState, run: RunDir, clock: _Clock, bar: Any) -> dict[str, Any]:
    """The train metrics line of the steps since the last one; starts a new interval."""
    now = time.perf_counter()
    record: dict[str, Any] = {"step": state.step, "split": "train"}
    for k, v in state.log_sums.items():
        record[k] = float(v) / max(state.log_count, 1)
    record["lr"] = state.optimizer.param_groups[0]["lr"]
    record["tasks_per_s"] = clock.tasks / max(now - clock.last_log, 1e-9)
    record["time_s"] = now - clock.start
    run.append_metrics(record)
    if bar is not None:
        bar.set_postfix(
            loss=f"{record.get('loss', math.nan):.3f}",
            acc=f"{record.get('accuracy', math.nan):.3f}",
            tasks_s=f"{record['tasks_per_s']:.1f}",
        )
    state.log_sums, state.log_count = {}, 0
    clock.tasks, clock.last_log = 0, now
    return record


def validate(
    state: TrainState, group: SingleProcess, run: RunDir, bar: Any, started: float
) -> dict[str, Any]:
    """Validation accuracy of the current meta-parameters; a new best writes ``best.pt``.

    Args:
        state: The run's state (``best`` is updated).
        group: The processes of the run (the episodes are split across them).
        run: The run directory (metrics line, ``best.pt``).
        bar: The progress bar, or None.
        started: ``time.perf_counter()`` when the pause for validation began.

    Returns:
        The validation record written to ``metrics.jsonl``.
    """
    t = state.config.train
    res = group.evaluate(
        state.learner, state.tasksets.validation, t.val_tasks, group.device, t.task_workers
    )
    res["eval_s"] = time.perf_counter() - started
    is_best = state.best is None or res["accuracy"] > state.best
    if is_best:
        state.best = res["accuracy"]
    record = {"step": state.step, "split": "validation", **res, "best": is_best}
    run.append_metrics(record)
    if is_best:
        _save(state, run, group, best=True)
    assert state.best is not None  # set above if it was None (is_best)
    if bar is not None:
        bar.write(
            f"step {state.step}: validation accuracy {100 * res['accuracy']:.2f}% "
            f"+- {100 * res['ci95']:.2f}% (best {100 * state.best:.2f}%)"
        )
    return record
