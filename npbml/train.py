"""Meta-training loop: outer optimisation, validation, checkpoints, metrics and exact resume.

One outer step (METHODS.md sections 2-3): draw a meta-batch of ``B`` tasks, let the learner
compute the meta-loss ``(1/B) sum_i L(Q_i; theta_i')`` of its adapted parameters, and take an
optimizer step on the meta-parameters (Adam by default, Finn et al. 2017).

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

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from npbml.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from npbml.config import Config, ConfigError, config_from_dict, diff_configs
from npbml.distributed import (
    DistContext,
    all_gather_object,
    all_reduce_gradients,
    all_reduce_metrics,
    broadcast_flag,
    broadcast_module,
    broadcast_object,
    evaluate_sharded,
    init_distributed,
    local_batch_size,
    rank_seed,
    sample_shard,
    shutdown,
    sync_buffers,
)
from npbml.evaluate import evaluate
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

# cb(step, records): the metrics.jsonl records written at that step (possibly none).
StepCallback = Callable[[int, list[dict[str, Any]]], None]


@dataclass
class TrainResult:
    """Outcome of :func:`train`: where it wrote, how far it got, its best validation accuracy.

    ``learner`` holds the final parameters (``out_dir/best.pt`` the best-validation ones);
    ``finished`` is False when the run was paused before ``meta_steps``. ``rank`` /
    ``world_size``: this process's place in a multi-process run (0 / 1 for a single process).
    """

    out_dir: Path
    step: int
    best_val_accuracy: float | None
    learner: nn.Module
    config: Config
    finished: bool
    rank: int = 0
    world_size: int = 1


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
    params = learner.meta_parameters() if hasattr(learner, "meta_parameters") else None
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
# Metrics file
# ---------------------------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (missing file -> ``[]``)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill mid-write; everything after it is lost anyway
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps ``<= step`` (the state of ``path`` when that checkpoint was made)."""
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# Checkpoint state
# ---------------------------------------------------------------------------------------------


def _grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients (NaN/inf if any entry is); torch >= 2.2 compatible."""
    norms = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _state(
    config: Config,
    model_kwargs: dict[str, Any],
    step: int,
    learner: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    tasksets: TaskSets,
    best: float | None,
    log_sums: dict[str, Any],
    log_count: int,
    nonfinite_streak: int = 0,
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": step,
        "config": config.to_dict(),
        "model_kwargs": dict(model_kwargs),
        "learner": learner.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "samplers": {
            "train": tasksets.train.state_dict(),
            "validation": tasksets.validation.state_dict(),
            "test": tasksets.test.state_dict(),
        },
        "rng": rng_state(),
        "best_val_accuracy": best,
        # Train metrics of the steps since the last log line, so that the next line after a
        # resume averages the same steps as in an uninterrupted run.
        "log_accumulator": {"sums": {k: float(v) for k, v in log_sums.items()}, "n": log_count},
        "nonfinite_streak": nonfinite_streak,
    }


def _check_format(state: dict[str, Any], path: Path) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an npbml training checkpoint")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} was written by a newer npbml (checkpoint version "
            f"{state['version']} > {CHECKPOINT_VERSION}); upgrade npbml to read it"
        )


def _check_resumable(saved: Config, config: Config, out_dir: Path) -> None:
    changed = [k for k in diff_configs(saved, config) if k not in RESUMABLE_CHANGES]
    if changed == ["train.meta_steps"] and config.train.lr_schedule == "none":
        return  # extending (or shortening) a constant-rate run is well defined
    if changed:
        raise ConfigError(
            f"{out_dir} holds a run with a different config (changed: {', '.join(changed)}); "
            "resume with the same config, start over with --no-resume, or choose another --out"
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
    the limit), writing ``last.pt`` so that a later call continues it; so does ``stop_when(step)``
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
        result = _train(
            config,
            out,
            resume,
            max_steps,
            max_seconds,
            callbacks,
            stop_when,
            tasksets,
            progress,
            ctx.device,
            ctx,
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


def _load_resume_state(
    config: Config, out: Path, last_path: Path, resume: bool, device: torch.device, ctx: DistContext
) -> dict[str, Any] | None:
    """The checkpoint to resume from (``None``: start over). In a multi-process run rank 0 reads
    and checks it and sends it to the others (no shared file system needed), or sends its error,
    which every rank then raises, so that no rank is left waiting in a collective."""
    if not ctx.distributed:
        if not (resume and last_path.exists()):
            return None
        state = load_checkpoint(last_path, map_location=device)
        _check_format(state, last_path)
        _check_resumable(config_from_dict(state["config"]), config, out)
        return state
    payload: Any = None
    error: BaseException | None = None
    if ctx.is_main:
        try:
            if resume and last_path.exists():
                state = load_checkpoint(last_path, map_location="cpu")
                _check_format(state, last_path)
                _check_resumable(config_from_dict(state["config"]), config, out)
                payload = ("state", state)
            else:
                payload = ("fresh", None)
        except (CheckpointError, ConfigError) as e:
            error, payload = e, ("error", type(e).__name__, str(e))
    payload = broadcast_object(payload, ctx)
    if payload[0] == "error":
        if error is not None:
            raise error
        raise (CheckpointError if payload[1] == "CheckpointError" else ConfigError)(payload[2])
    return payload[1]


def _train(
    config: Config,
    out: Path,
    resume: bool,
    max_steps: int | None,
    max_seconds: float | None,
    callbacks: Sequence[StepCallback],
    stop_when: Callable[[int], bool] | None,
    tasksets: TaskSets | None,
    progress: bool,
    device: torch.device,
    ctx: DistContext | None = None,
) -> TrainResult:
    ctx = ctx if ctx is not None else DistContext(device=device)
    main = ctx.is_main
    t = config.train
    metrics_path = out / "metrics.jsonl"
    last_path, best_path = out / "last.pt", out / "best.pt"
    seed_everything(t.seed)
    if tasksets is None:
        tasksets = make_tasksets(config)
    model_kwargs = infer_model_kwargs(config, tasksets)
    learner = build_learner(config, model_kwargs).to(device)
    broadcast_module(learner, ctx)
    if ctx.rank > 0:
        # Global RNGs (dropout, augmentation) independent across ranks; rank 0 keeps the
        # single-process stream.
        seed_everything(rank_seed(t.seed, ctx.rank))
    params = _meta_parameters(learner)
    optimizer = make_optimizer(config, params)
    scheduler = make_scheduler(config, optimizer)

    step, best, nonfinite_streak = 0, None, 0
    sums: dict[str, Any] = {}
    n_since_log = 0
    state = _load_resume_state(config, out, last_path, resume, device, ctx)
    if state is not None:
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        for split in ("train", "validation", "test"):
            getattr(tasksets, split).load_state_dict(state["samplers"][split])
        step, best = int(state["step"]), state["best_val_accuracy"]
        per_rank = state.get("rng_ranks")
        if per_rank is not None and len(per_rank) == ctx.world_size:
            set_rng_state(per_rank[ctx.rank])
        elif ctx.rank == 0:
            set_rng_state(state["rng"])
        else:  # resumed with another number of processes: fresh streams for the other ranks
            seed_everything(rank_seed(t.seed * 1_000_003 + step, ctx.rank))
        acc = state.get("log_accumulator") or {"sums": {}, "n": 0}
        sums, n_since_log = dict(acc["sums"]), int(acc["n"])
        nonfinite_streak = int(state.get("nonfinite_streak", 0))
        if main:
            _truncate_metrics(metrics_path, step)
    elif main:
        metrics_path.write_text("")
        for p in (last_path, best_path):
            p.unlink(missing_ok=True)
    del state
    if main:
        config.save(out / "config.yaml")

    def checkpoint(path: Path) -> None:
        # Collective in a multi-process run: every rank calls it at the same steps.
        rngs = None
        if ctx.distributed:
            sync_buffers(learner, ctx)
            rngs = all_gather_object(rng_state(), ctx)
        if not main:
            return
        st = _state(
            config,
            model_kwargs,
            step,
            learner,
            optimizer,
            scheduler,
            tasksets,
            best,
            sums,
            n_since_log,
            nonfinite_streak,
        )
        if rngs is not None:
            st.update(world_size=ctx.world_size, rng_ranks=rngs)
        save_checkpoint(path, st)

    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.meta_steps, initial=step, desc="meta-train", dynamic_ncols=True)

    start_step, t_start = step, time.perf_counter()
    t_log, tasks_since_log = t_start, 0
    finished = step >= t.meta_steps
    try:
        while step < t.meta_steps:
            learner.train()
            batch = sample_shard(tasksets.train, t.meta_batch_size, ctx)
            if device.type != "cpu":
                batch = batch.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            if t.per_task_backward or t.task_workers > 1:
                info = learner.meta_backward(batch, workers=t.task_workers)
                loss = None
            else:
                loss, info = learner.outer_loss(batch)
                loss.backward()
            # One norm over all meta-gradients (needed for clipping anyway) tells whether any
            # is non-finite; learned losses and preconditioners can diverge (METHODS.md sec 3).
            norm = _grad_norm(params)
            meta_loss = info.get("loss", loss.detach() if loss is not None else 0.0)
            finite = bool(torch.isfinite(norm)) and math.isfinite(float(meta_loss))
            if ctx.distributed:
                # Mean over the ranks' equal shares = mean over the B tasks; the skip decision
                # below must be the same on every rank, or the ranks fall out of step.
                all_reduce_gradients(params, ctx)
                acc = info.get("accuracy")
                meta_loss, acc, finite = all_reduce_metrics(
                    float(meta_loss), None if acc is None else float(acc), finite, ctx
                )
                info = {**info, "loss": meta_loss}
                if acc is not None:
                    info["accuracy"] = acc
                norm = _grad_norm(params)
                finite = finite and bool(torch.isfinite(norm))
            step += 1
            tasks_since_log += t.meta_batch_size
            if not finite:
                nonfinite_streak += 1
                optimizer.zero_grad(set_to_none=True)
                skip = {"step": step, "split": "train", "skipped": "nonfinite"}
                # Strings, so that metrics.jsonl stays strict JSON (no NaN/Infinity literals).
                skip.update(meta_loss=str(float(meta_loss)), grad_norm=str(float(norm)))
                if main:
                    _append_metrics(metrics_path, skip)
                    warnings.warn(
                        f"step {step}: non-finite meta-loss ({float(meta_loss)}) or meta-gradient "
                        f"norm ({float(norm)}); meta-step skipped "
                        f"({nonfinite_streak}/{t.max_nonfinite_steps} in a row)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                if nonfinite_streak >= t.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"{nonfinite_streak} meta-steps in a row had a non-finite meta-loss or "
                        f"meta-gradient (last at step {step}); stopped. The last good checkpoint "
                        f"{str(last_path)!r} is intact. Lower train.meta_lr or "
                        "algorithm.inner_lr, or set train.grad_clip, then resume."
                    )
            else:
                nonfinite_streak = 0
                if t.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                n_since_log += 1
                # Summed as given (floats or 0-dim tensors) and converted once per log interval.
                for k in ("loss", "accuracy"):
                    v = info.get(k, loss.detach() if k == "loss" and loss is not None else None)
                    if v is not None:
                        sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)

            records: list[dict[str, Any]] = []
            if step % t.log_every == 0 or step == t.meta_steps:
                now = time.perf_counter()
                record = {"step": step, "split": "train"}
                for k, v in sums.items():
                    record[k] = float(v) / max(n_since_log, 1)
                record["lr"] = optimizer.param_groups[0]["lr"]
                record["tasks_per_s"] = tasks_since_log / max(now - t_log, 1e-9)
                record["time_s"] = now - t_start
                if main:
                    _append_metrics(metrics_path, record)
                records.append(record)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{record.get('loss', math.nan):.3f}",
                        acc=f"{record.get('accuracy', math.nan):.3f}",
                        tasks_s=f"{record['tasks_per_s']:.1f}",
                    )
                sums, n_since_log, tasks_since_log, t_log = {}, 0, 0, now

            stop = (
                (max_steps is not None and step >= max_steps)
                or (max_seconds is not None and time.perf_counter() - t_start >= max_seconds)
                or (stop_when is not None and bool(stop_when(step)))
            )
            if max_seconds is not None or stop_when is not None:
                stop = broadcast_flag(stop, ctx)  # wall-clock decisions: rank 0's for all
            t_pause = time.perf_counter()
            if step % t.val_every == 0 or step == t.meta_steps:
                if ctx.distributed:
                    sync_buffers(learner, ctx)
                    res = evaluate_sharded(learner, tasksets.validation, t.val_tasks, ctx, device)
                else:
                    res = evaluate(
                        learner,
                        tasksets.validation,
                        t.val_tasks,
                        device=device,
                        workers=t.task_workers,
                    )
                res["eval_s"] = time.perf_counter() - t_pause
                is_best = best is None or res["accuracy"] > best
                if is_best:
                    best = res["accuracy"]
                val_record = {"step": step, "split": "validation", **res, "best": is_best}
                if main:
                    _append_metrics(metrics_path, val_record)
                records.append(val_record)
                if is_best:
                    checkpoint(best_path)
                if bar is not None:
                    bar.write(
                        f"step {step}: validation accuracy {100 * res['accuracy']:.2f}% "
                        f"+- {100 * res['ci95']:.2f}% (best {100 * best:.2f}%)"
                    )
            if step % t.checkpoint_every == 0 or step == t.meta_steps or stop:
                checkpoint(last_path)
            # Validation and checkpoint time do not count against the training throughput.
            t_log += time.perf_counter() - t_pause
            if bar is not None:
                bar.update(1)
            for cb in callbacks:
                cb(step, records)
            if stop:
                break
        finished = step >= t.meta_steps
    finally:
        if bar is not None:
            bar.close()
    if best is None and step > start_step:
        checkpoint(best_path)  # paused before the first validation: best.pt is the latest state
    return TrainResult(out, step, best, learner, config, finished, ctx.rank, ctx.world_size)
