"""Meta-test evaluation: mean accuracy with a 95% interval over fixed episodes, and Lake's runs.

Protocol (docs/methods/protocol.md): adapt on each test task's support set, score its query set, and
report the mean accuracy over at least 600 tasks with the half-width ``1.96 * std / sqrt(n)`` of
a normal-approximation 95% confidence interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, cast

import numpy as np
import torch

from tasks.episode import Episode
from tasks.sampler import EpisodeSource


class Evaluable(Protocol):
    """What evaluation needs from a meta-learner: adapt to ``episode``, score its query set."""

    def evaluate(self, episode: Episode) -> dict[str, float]: ...


class LakeRunsLike(Protocol):
    def __len__(self) -> int: ...

    def episode(self, r: int) -> Episode: ...


def mean_confidence_interval(
    values: Sequence[float] | np.ndarray | torch.Tensor, ddof: int = 1
) -> tuple[float, float]:
    """Mean and 95% half-width ``1.96 * s / sqrt(n)`` of ``values`` (docs/methods/protocol.md).

    ``s`` is the standard deviation with ``ddof`` delta degrees of freedom. The default
    ``ddof=1`` (the sample standard deviation, whose square is the unbiased variance estimate)
    is the textbook standard error of a mean; MAML's released code used ``np.std`` (``ddof=0``),
    which is smaller by ``sqrt((n-1)/n)`` (0.08% at n = 600) — pass ``ddof=0`` to match it.
    With fewer than ``ddof + 1`` values the interval is undefined and the half-width is ``nan``.
    """
    x = np.asarray(
        values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values,
        dtype=np.float64,
    ).ravel()
    n = x.size
    if n == 0:
        raise ValueError("mean_confidence_interval needs at least one value")
    mean = float(x.mean())
    if n <= ddof:
        return mean, math.nan
    return mean, float(1.96 * x.std(ddof=ddof) / math.sqrt(n))


#: An adapted logit above this (or non-finite) counts an episode as diverged (issue 12's bound).
DIVERGED_LOGIT = 100.0


def _scores(metrics: dict[str, Any]) -> tuple[float, float]:
    """``(accuracy, max |adapted logit|)`` of one episode's metrics (0 when not reported)."""
    return float(metrics["accuracy"]), float(metrics.get("max_abs_logit", 0.0))


def evaluate(
    learner: Evaluable,
    sampler: EpisodeSource,
    num_tasks: int,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "eval",
    workers: int = 1,
    per_task: bool = False,
) -> dict[str, Any]:
    """Mean query accuracy over episodes ``0 .. num_tasks-1`` of ``sampler``, with its 95% interval.

    Episodes are drawn by index (``sampler.sample(i)``), so repeated evaluations of different
    checkpoints see the same tasks and the sampler's own stream position is untouched.
    ``workers`` > 1 adapts that many episodes at once on CPU threads (an ``nn.Module`` learner;
    :func:`npbml.algorithms.task_parallel.parallel_map`); episodes are still drawn in this thread
    and the accuracies are the same as with one worker.
    Returns ``{"accuracy": mean, "ci95": half_width, "tasks": n, "max_abs_logit": m,
    "diverged": k}`` (accuracies as fractions; ``m`` the largest adapted query logit over the
    episodes, ``k`` how many episodes exceed :data:`DIVERGED_LOGIT` or are non-finite);
    with ``per_task=True`` also ``"accuracies"``, the accuracy of each episode in index order (for
    paired comparisons of learners on the same episodes, :func:`paired_difference`).
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    parallel = workers > 1 and isinstance(learner, torch.nn.Module)
    if parallel:
        from npbml.algorithms.task_parallel import parallel_map
    # A learner that adapts several tasks at once (NPBML's batched inner loop, issue 13) gets
    # them stacked; the accuracies are those of one episode at a time.
    group = 1 if parallel else max(1, int(getattr(learner, "evaluation_batch", 1)))
    chunk = 4 * workers if parallel else group
    accs = np.empty(num_tasks, dtype=np.float64)
    peaks = np.zeros(num_tasks, dtype=np.float64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_tasks, desc=desc, leave=False, dynamic_ncols=True)
    for start in range(0, num_tasks, chunk):
        episodes = [sampler.sample(i) for i in range(start, min(start + chunk, num_tasks))]
        if device is not None:
            episodes = [e.to(device) for e in episodes]
        if parallel and isinstance(learner, torch.nn.Module):  # parallel implies the isinstance
            res = parallel_map(
                learner,
                episodes,
                # rep is a replicate() of learner: a shallow copy, of the same (Evaluable) class
                lambda rep, ep: _scores(cast(Evaluable, rep).evaluate(ep)),
                workers,
            )
        elif group > 1 and len(episodes) > 1 and _same_shapes(episodes):
            m = cast(dict[str, Any], learner.evaluate(Episode.stack(episodes)))
            res = [(float(a), float(p)) for a, p in zip(m["accuracies"], m["max_abs_logits"])]
        else:
            res = [_scores(learner.evaluate(e)) for e in episodes]
        accs[start : start + len(res)] = [r[0] for r in res]
        peaks[start : start + len(res)] = [r[1] for r in res]
        if bar is not None:
            bar.update(len(res))
    if bar is not None:
        bar.close()
    mean, h = mean_confidence_interval(accs)
    out: dict[str, Any] = {"accuracy": mean, "ci95": h, "tasks": int(num_tasks)}
    # Divergence check: episodes whose adapted logits are non-finite or above DIVERGED_LOGIT.
    out["max_abs_logit"] = float(peaks.max())
    out["diverged"] = int((peaks > DIVERGED_LOGIT).sum())
    if per_task:
        out["accuracies"] = accs.tolist()
    return out


def _same_shapes(episodes: Sequence[Episode]) -> bool:
    shapes = {(e.support_x.shape, e.support_y.shape, e.query_x.shape) for e in episodes}
    return len(shapes) == 1


def _as_array(
    values: Sequence[float] | Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def paired_difference(
    a: Sequence[float] | np.ndarray | torch.Tensor,
    b: Sequence[float] | np.ndarray | torch.Tensor,
    ddof: int = 1,
) -> dict[str, Any]:
    """Paired per-episode difference ``a - b`` of two learners on the SAME episodes.

    The comparison docs/methods/protocol.md asks for: on fixed test episodes the per-episode
    differences cancel the episode difficulty both learners share, so their interval is much
    narrower than the two accuracies' intervals suggest. The interval is that of
    :func:`mean_confidence_interval` over the differences (``mean +- 1.96 * s / sqrt(n)``).

    Args:
        a: per-episode accuracies of one learner (``evaluate(..., per_task=True)["accuracies"]``).
        b: those of the reference learner, on the same episodes in the same order.
        ddof: delta degrees of freedom of ``s`` (see :func:`mean_confidence_interval`).

    Returns:
        ``{"mean", "ci95", "n", "wins", "losses", "ties"}``: the mean difference, its 95%
        half-width, the number of episodes, and on how many ``a`` was better, worse, equal.
    """
    x, y = _as_array(a).ravel(), _as_array(b).ravel()
    if x.shape != y.shape:
        raise ValueError(
            f"paired_difference needs per-episode values of the same episodes: got {x.size} and "
            f"{y.size} values; evaluate both learners on the same episodes"
        )
    d = x - y
    mean, h = mean_confidence_interval(d, ddof=ddof)
    return {
        "mean": mean,
        "ci95": h,
        "n": int(d.size),
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "ties": int((d == 0).sum()),
    }


def pooled_paired_difference(
    a: Sequence[Sequence[float]] | np.ndarray,
    b: Sequence[Sequence[float]] | np.ndarray,
    ddof: int = 1,
) -> dict[str, Any]:
    """Paired differences ``a - b`` over several seeds that all used the same test episodes.

    ``a[s][i]`` is learner A's accuracy on episode ``i`` when trained with seed ``s``; likewise
    ``b``. Each seed gets its own :func:`paired_difference`. The pooled mean is the mean over
    all seeds and episodes. Its interval is computed over the per-episode differences averaged
    across seeds (the episodes are shared, so seed x episode values are not independent draws);
    it measures episode sampling, not training variation, which ``seed_sd`` (the standard
    deviation of the per-seed means, ``ddof=1``) shows instead.

    Args:
        a: ``[seeds, episodes]`` per-episode accuracies of learner A.
        b: the same for the reference learner B.
        ddof: as in :func:`paired_difference`.

    Returns:
        ``{"per_seed": [paired_difference, ...], "mean", "ci95", "seed_sd", "seeds", "n"}``.
    """
    x, y = _as_array(a), _as_array(b)
    if x.ndim != 2 or x.shape != y.shape or x.shape[0] < 1:
        raise ValueError(
            f"pooled_paired_difference needs two [seeds, episodes] arrays of the same shape, got "
            f"{x.shape} and {y.shape}; evaluate every seed on the same episodes"
        )
    per_seed = [paired_difference(x[s], y[s], ddof) for s in range(x.shape[0])]
    means = np.array([p["mean"] for p in per_seed])
    _, h = mean_confidence_interval((x - y).mean(axis=0), ddof=ddof)
    return {
        "per_seed": per_seed,
        "mean": float((x - y).mean()),
        "ci95": h,
        "seed_sd": float(means.std(ddof=1)) if means.size > 1 else math.nan,
        "seeds": int(x.shape[0]),
        "n": int(x.shape[1]),
    }


def evaluate_lake(
    learner: Evaluable, runs: LakeRunsLike, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Error rate on Lake et al.'s (2015) 20-way within-alphabet one-shot runs.

    Format of the runs: docs/data-formats.md.

    Each run is one episode (20 support images, one per class; 20 query items); the learner
    adapts on the support and classifies the items. The error rate is the number of misclassified
    items over all runs divided by the number of items (400 for the 20 official runs).
    Returns ``{"error_rate", "errors", "items", "runs", "per_run_errors"}``.
    """
    per_run: list[int] = []
    items = 0
    for r in range(len(runs)):
        episode = runs.episode(r)
        if device is not None:
            episode = episode.to(device)
        n = int(episode.query_y.numel())
        acc = float(learner.evaluate(episode)["accuracy"])
        # accuracy is a fraction of n items; round back to the integer count of errors.
        per_run.append(int(round((1.0 - acc) * n)))
        items += n
    if items == 0:
        raise ValueError("evaluate_lake: the runs hold no test items")
    errors = sum(per_run)
    return {
        "error_rate": errors / items,
        "errors": errors,
        "items": items,
        "runs": len(per_run),
        "per_run_errors": per_run,
    }
