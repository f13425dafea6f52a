"""ML3's regression showcase on sinusoids (Bechtle et al. 2020, arXiv 1906.05374, sec V).

Tasks are ``y = A sin(x - w)`` with amplitude ``A ~ U[0.1, 5]``, phase ``w ~ U[0, pi]`` and
``x ~ U[-5, 5]`` (the MAML sinusoid family; task parameters drawn by
:class:`tasks.SinusoidTasks`). A regression :class:`~npbml.losses.LearnedLoss` is meta-learned
with ML3 on one (or a few) sinusoid task(s), then trains *fresh* models on *new* sinusoids.

The default base model is the two-parameter ``f(x) = a sin(x - b)`` (:class:`SineModel`); the
MAML MLP is available (``model="mlp"``) but with these short budgets its learned loss does not
reliably beat its starting MSE. The "shaped" variant is ML3's use of meta-train-time
information: the meta-objective adds ``lambda * ((a - A)^2 + (b - w)^2)`` with the true
amplitude and phase, steering the learned loss past the phase's non-convex MSE landscape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from npbml.loss_learning.ml3 import ML3, Batch, MetaObjective, train_with_loss
from npbml.losses.learned import LearnedLoss

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


class SineModel(nn.Module):
    """``f(x) = amplitude * sin(x - phase)``: the model of ML3's shaped-loss example."""

    def __init__(self, amplitude: float = 1.0, phase: float = 0.0) -> None:
        super().__init__()
        self.amplitude = nn.Parameter(torch.tensor(float(amplitude)))
        self.phase = nn.Parameter(torch.tensor(float(phase)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.amplitude * torch.sin(x - self.phase)


def sinusoid_mlp(hidden: int = 40) -> nn.Module:
    """The MAML/ML3 sinusoid regressor: 1 -> hidden -> hidden -> 1 with ReLU."""
    return nn.Sequential(
        nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )


@dataclass(frozen=True)
class SinusoidTask:
    """One sinusoid ``y = amplitude * sin(x - phase)``."""

    amplitude: float
    phase: float

    def batch(self, k: int, generator: torch.Generator) -> Batch:
        """``(x [k,1], y [k,1], amplitude, phase)``; the last two feed a shaped objective only."""
        lo, hi = X_RANGE
        x = torch.rand(k, 1, generator=generator) * (hi - lo) + lo
        y = self.amplitude * torch.sin(x - self.phase)
        return (x, y, torch.tensor(self.amplitude), torch.tensor(self.phase))


def sample_tasks(num_tasks: int, seed: int) -> list[SinusoidTask]:
    """``num_tasks`` tasks of the MAML sinusoid family, drawn by :class:`tasks.SinusoidTasks`
    (its episodes ``0..num_tasks-1`` with seed ``seed``; their ``classes`` are amplitude, phase)."""
    from tasks.sinusoid import SinusoidTasks

    sampler = SinusoidTasks(shots=1, queries=0, seed=seed)
    out = []
    for i in range(num_tasks):
        amplitude, phase = sampler.sample(i).classes.tolist()
        out.append(SinusoidTask(amplitude, phase))
    return out


def shaped_objective(weight: float = 1.0) -> MetaObjective:
    """ML3 shaped meta-objective: MSE plus ``weight`` times the squared distance of the adapted
    ``(amplitude, phase)`` of a :class:`SineModel` to the true ones (``batch[2]``, ``batch[3]``)."""

    def objective(preds: torch.Tensor, batch: Batch, params: Mapping[str, torch.Tensor]):
        mse = F.mse_loss(preds, batch[1])
        if "amplitude" not in params or "phase" not in params:
            raise KeyError("shaped_objective needs a SineModel (parameters amplitude, phase)")
        dist = (params["amplitude"] - batch[2]) ** 2 + (params["phase"] - batch[3]) ** 2
        return mse + weight * dist

    return objective


def _task_batches(tasks: list[SinusoidTask], k: int, gen: torch.Generator) -> Iterator:
    i = 0
    while True:
        task = tasks[i % len(tasks)]
        i += 1
        yield task.batch(k, gen), task.batch(k, gen)


def make_base_model(kind: str, generator: torch.Generator) -> nn.Module:
    """A fresh base model: ``"mlp"`` (default init) or ``"sine"`` (random amplitude and phase)."""
    if kind == "mlp":
        return sinusoid_mlp()
    if kind == "sine":
        a, w = torch.rand(2, generator=generator).tolist()
        return SineModel(0.1 + 4.9 * a, math.pi * w)
    raise ValueError(f"model must be 'mlp' or 'sine', got {kind!r}")


def meta_train_sinusoid_loss(
    steps: int = 500,
    num_tasks: int = 1,
    model: str = "sine",
    shaped: bool = False,
    shaped_weight: float = 1.0,
    inner_lr: float = 0.05,
    meta_lr: float = 3e-3,
    shots: int = 20,
    reset_every: int | None = 20,
    seed: int = 0,
) -> tuple[LearnedLoss, list[float]]:
    """Meta-learn a regression loss with ML3 on ``num_tasks`` sinusoid task(s).

    Every ``reset_every`` meta steps a fresh base model is drawn (ML3: the loss must train *new*
    models; in between, the model keeps the inner step's result). Each meta step takes one
    differentiable SGD step on the learned loss over ``shots`` points and updates ``phi`` with
    the MSE (or the shaped objective, which needs ``model="sine"``) on ``shots`` new points.
    Returns the loss network and the meta-loss history.
    """
    if shaped and model != "sine":
        raise ValueError("the shaped objective reads amplitude/phase parameters: use model='sine'")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tasks = sample_tasks(num_tasks, seed)
    loss_net = LearnedLoss(task="regression")
    ml3 = ML3(
        loss_net,
        inner_lr=inner_lr,
        meta_lr=meta_lr,
        meta_objective=shaped_objective(shaped_weight) if shaped else None,
    )
    history = ml3.meta_train(
        lambda: make_base_model(model, gen), _task_batches(tasks, shots, gen), steps, reset_every
    )
    return loss_net, history


def evaluate_loss_on_new_tasks(
    loss_fn: nn.Module,
    num_tasks: int = 5,
    model: str = "sine",
    train_steps: int = 20,
    lr: float = 0.05,
    shots: int = 20,
    seed: int = 1234,
) -> dict[str, float]:
    """Train fresh models with ``loss_fn`` on new sinusoids; mean MSE before and after.

    MSE is measured on 200 evenly spaced points of ``[-5, 5]``. Seeds fix the tasks and the model
    initialisations, so two losses evaluated with one seed see identical tasks and models.
    """
    gen = torch.Generator().manual_seed(seed)
    xs = torch.linspace(*X_RANGE, 200).unsqueeze(1)
    tasks = sample_tasks(num_tasks, seed)
    model_seeds = torch.randint(0, 2**31 - 1, (num_tasks,), generator=gen).tolist()
    before, after = [], []
    for task, model_seed in zip(tasks, model_seeds):
        model_gen = torch.Generator().manual_seed(model_seed)
        torch.manual_seed(model_seed)
        net = make_base_model(model, model_gen)
        ys = task.amplitude * torch.sin(xs - task.phase)
        with torch.no_grad():
            before.append(F.mse_loss(net(xs), ys).item())
        batches = iter(functools.partial(task.batch, shots, model_gen), None)
        train_with_loss(net, loss_fn, batches, train_steps, lr)
        with torch.no_grad():
            after.append(F.mse_loss(net(xs), ys).item())
    return {
        "mse_before": sum(before) / num_tasks,
        "mse_after": sum(after) / num_tasks,
    }
