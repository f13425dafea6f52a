"""Sinusoid regression tasks of Finn et al., "Model-Agnostic Meta-Learning", ICML 2017, sec. 5.1.

Each task is ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5.0]``, phase ``~ U[0, pi]`` and
inputs ``x ~ U[-5, 5]`` (the sign convention of the paper's reference code). A task's support set
has ``shots`` points and its query set ``queries`` points, all drawn independently. The MAML paper
trains a 1-40-40-1 ReLU MLP on the mean squared error with K = 5 or 10 shots.

Usage::

    from tasks.sinusoid import SinusoidTasks

    tasks = SinusoidTasks(shots=10, queries=10, seed=0)
    episode = tasks.sample()            # support_x/support_y [10, 1], query_x/query_y [10, 1]
    amplitude, phase = episode.classes  # the task's parameters
    batch = tasks.sample_batch(25)      # meta-batch: [25, 10, 1] tensors, classes [25, 2]
    # Evaluation curve of a task, for plots:
    x = torch.linspace(-5, 5, 200)[:, None]
    y = SinusoidTasks.function(x, amplitude, phase)

Like :class:`tasks.sampler.TaskSampler`, task ``i`` is a pure function of ``(seed, i)`` (numpy's
PCG64, identical on every platform), so streams are reproducible, resumable from
:meth:`SinusoidTasks.state_dict` and splittable across workers by index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from tasks.episode import Episode
from tasks.sampler import IndexedEpisodes


def _interval(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high); got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{name} must be finite with low <= high; got {value!r}")
    return lo, hi


class SinusoidTasks(IndexedEpisodes):
    """Sinusoid regression episodes (Finn et al. 2017, sec. 5.1).

    ``sample(index)`` returns an :class:`~tasks.episode.Episode` with float32 tensors
    ``support_x``/``support_y`` of shape ``[shots, 1]`` and ``query_x``/``query_y`` of shape
    ``[queries, 1]``; ``classes`` holds the task's parameters ``[amplitude, phase]`` (float32).
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        seed: int = 0,
        amplitude_range: Sequence[float] = (0.1, 5.0),
        phase_range: Sequence[float] = (0.0, math.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
    ) -> None:
        if int(shots) != shots or shots < 1:
            raise ValueError(f"shots must be an integer >= 1; got {shots!r}")
        if int(queries) != queries or queries < 0:
            raise ValueError(f"queries must be an integer >= 0; got {queries!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be an integer >= 0 (a PCG64 seed); got {seed!r}")
        self.shots, self.queries, self.seed = int(shots), int(queries), int(seed)
        self.amplitude_range = _interval("amplitude_range", amplitude_range)
        self.phase_range = _interval("phase_range", phase_range)
        self.x_range = _interval("x_range", x_range)
        self.index = 0

    @staticmethod
    def function(
        x: torch.Tensor, amplitude: float | torch.Tensor, phase: float | torch.Tensor
    ) -> torch.Tensor:
        """The task function ``A sin(x - phase)`` (MAML sec. 5.1, reference-code sign)."""
        return amplitude * torch.sin(x - phase)

    def episode(self, index: int) -> Episode:
        """Task ``index`` (a pure function of ``(seed, index)``)."""
        rng = self.rng(index)
        amplitude = rng.uniform(*self.amplitude_range)
        phase = rng.uniform(*self.phase_range)
        x = rng.uniform(*self.x_range, size=(self.shots + self.queries, 1))
        # float64 then one rounding, so that y is the float32 of the exact task function.
        y = amplitude * np.sin(x - phase)
        x32 = torch.from_numpy(x.astype(np.float32))
        y32 = torch.from_numpy(y.astype(np.float32))
        return Episode(
            support_x=x32[: self.shots],
            support_y=y32[: self.shots],
            query_x=x32[self.shots :],
            query_y=y32[self.shots :],
            classes=torch.tensor([amplitude, phase], dtype=torch.float32),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.shots} shots, {self.queries} queries, "
            f"amplitude {self.amplitude_range}, phase {self.phase_range}, x {self.x_range}, "
            f"seed={self.seed})"
        )
