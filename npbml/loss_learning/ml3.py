"""ML3: offline meta-learning of a loss network by one-step unrolled differentiation.

Bechtle et al., "Meta-Learning via Learned Loss" (ICPR 2020, arXiv 1906.05374; method page
docs/methods/learned-losses.md): repeat for S steps -- take one (or J) differentiable inner step(s)
``theta' = theta - alpha * grad_theta M_phi(f_theta(x), y)`` on a training batch, then update
``phi`` with ``grad_phi L_task(f_theta'(x_v), y_v)`` on a meta (validation) batch. The task loss
(the meta-objective) may use meta-train-time extra information (ML3's "shaped" losses): it is
any callable ``meta_objective(predictions, batch, params) -> scalar``.

Batches are tuples ``(x, y, *extra)``; ``extra`` is passed through to the meta-objective only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from npbml.inner import InnerSGD, SGDState
from npbml.losses.learned import all_finite
from npbml.params import functional_forward

logger = logging.getLogger(__name__)

Batch = Sequence[torch.Tensor]
Params = dict[str, torch.Tensor]
MetaObjective = Callable[[torch.Tensor, Batch, Mapping[str, torch.Tensor]], torch.Tensor]


def default_meta_objective(task: str) -> MetaObjective:
    """The plain task loss: cross-entropy (``"classification"``) or MSE (``"regression"``)."""
    if task == "classification":
        return lambda preds, batch, params: F.cross_entropy(preds, batch[1])
    if task == "regression":
        return lambda preds, batch, params: F.mse_loss(preds, batch[1].reshape(preds.shape))
    raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")


def model_params(model: nn.Module) -> Params:
    """Detached, grad-requiring copies of a model's trainable parameters (the inner-loop start)."""
    return {
        k: v.detach().clone().requires_grad_()
        for k, v in model.named_parameters()
        if v.requires_grad
    }


class GuardedLoss(nn.Module):
    """A learned loss that cannot stall or wreck training: its step is bounded against CE's.

    Why (issue 15, measured on Fashion-MNIST in ``docs/losses.md``): the papers' form does not
    bound the learned loss's step, and each way it goes wrong was measured. A fresh
    :class:`~npbml.losses.LearnedLoss` has a logit gradient of ~0.1% of cross-entropy's, pointing
    *against* it in 2 of 5 seeds; after 1000 ML3 meta steps it was still 4-12% of CE's, and the
    first epoch ended at 40-61% validation accuracy (72-74% guarded). Or the one-step
    meta-objective, which rewards a steep slope of ``g(p_t, 1)`` at the predictions it sees,
    moves the softplus knee onto them; past the knee the loss is flat, and since ML3 trains its
    meta-training model with the loss itself, that model never passes the knee and the
    meta-objective never sees the flat region (measured with [0, 1] pixels and a
    PyTorch-initialised MLP: ``g(p, 1) < 0.01`` from ``p = 0.3-0.4`` on in 4 of 5 seeds). A loss
    that is flat stalls; one that is steep, or rewards wrong classes, diverges.

    The guard (this toolkit's, not the papers'): with ``g_M = dM/dz`` and ``g_C = dCE/dz`` at the
    batch's predictions ``z`` (the reference is MSE for regression),

    1. direction: if ``cos(g_M, g_C) < min_cosine`` (default 0: the step would raise the batch's
       cross-entropy to first order), the smallest ``c >= 0`` for which ``g_M + c g_C`` reaches
       that cosine is found in closed form (with ``a = <g_M, g_C> / |g_C|`` and ``b`` the norm of
       ``g_M``'s part orthogonal to ``g_C``, ``c |g_C| = k b / sqrt(1 - k^2) - a`` for ``k =
       min_cosine``; ``c = -<g_M, g_C> / |g_C|^2`` at ``k = 0``), and ``c`` times CE is added;
    2. scale: the result is multiplied by ``s`` so that ``|s (g_M + c g_C)|`` lies in
       ``[min_ratio, max_ratio] |g_C|`` (a loss whose gradient vanishes is lifted to
       ``min_ratio`` of CE's step; one that explodes is cut to ``max_ratio``).

    ``c`` and ``s`` are per-batch constants (no gradient flows through them), so the gradient
    w.r.t. the loss network's parameters keeps the learned loss's own dependence, scaled; the
    meta-learner still chooses the direction and, within the bounds, the step size. Cost: one
    extra backward through the loss network at the logits. Without a graph to the predictions
    (evaluation, ``torch.no_grad``) the plain ``M`` is returned.

    Args:
        loss_net: the learned loss ``M_phi`` (``(predictions, targets) -> scalar``, mean over
            the batch, e.g. :class:`~npbml.losses.LearnedLoss`).
        min_ratio: lower bound of the step's logit-gradient norm, as a fraction of CE's.
        max_ratio: upper bound, as a multiple of CE's.
        min_cosine: smallest cosine between the step's logit gradient and CE's, in [0, 1).
        task: ``"classification"`` (reference CE) or ``"regression"`` (reference MSE); default
            ``loss_net.task``.
    """

    def __init__(
        self,
        loss_net: nn.Module,
        min_ratio: float = 0.25,
        max_ratio: float = 4.0,
        task: str | None = None,
        min_cosine: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 < min_ratio <= max_ratio:
            raise ValueError(
                f"GuardedLoss needs 0 < min_ratio <= max_ratio, got {min_ratio} and {max_ratio}"
            )
        if not 0.0 <= min_cosine < 1.0:
            raise ValueError(f"GuardedLoss needs 0 <= min_cosine < 1, got {min_cosine}")
        self.min_cosine = float(min_cosine)
        self.net = loss_net
        self.min_ratio, self.max_ratio = float(min_ratio), float(max_ratio)
        net_task: str = getattr(loss_net, "task", "classification")  # LearnedLoss.task: a str
        self.task = task or net_task
        self.reference = default_meta_objective(self.task)
        self.last: dict[str, float] = {}

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = self.net(predictions, targets)
        if value.dim() != 0:
            raise ValueError(
                f"GuardedLoss bounds a batch's step, so its loss must return a scalar; got shape "
                f"{tuple(value.shape)}: use reduction='mean' (or 'sum') in the loss network"
            )
        if not (torch.is_grad_enabled() and predictions.requires_grad and value.requires_grad):
            return value
        (g_m,) = torch.autograd.grad(value, predictions, retain_graph=True)
        z = predictions.detach().requires_grad_()
        with torch.enable_grad():
            (g_c,) = torch.autograd.grad(self.reference(z, (z, targets), {}), z)
        cc = float((g_c * g_c).sum())
        if cc == 0.0 or not math.isfinite(cc):  # CE is flat (or broken) here: nothing to bound
            return value
        dot = float((g_m * g_c).sum())
        a = dot / math.sqrt(cc)  # g_M's component along g_C, and its orthogonal part's norm b
        b = math.sqrt(max(0.0, float((g_m * g_m).sum()) - a * a))
        k = self.min_cosine
        if k == 0.0:
            c = max(0.0, -dot / cc)
        else:
            c = max(0.0, (k * b / math.sqrt(1.0 - k * k) - a) / math.sqrt(cc))
        norm = float((g_m + c * g_c).norm()) / math.sqrt(cc)  # |g_M + c g_C| / |g_C|
        ref = self.reference(predictions, (predictions, targets), {})
        if not math.isfinite(norm) or norm < 1e-12:
            # No usable direction (the loss is flat here): take CE's, at the smallest step.
            self.last = {"coef": 0.0, "scale": 0.0, "ratio": norm}
            return value * 0.0 + self.min_ratio * ref
        scale = min(max(norm, self.min_ratio), self.max_ratio) / norm
        self.last = {"coef": c, "scale": scale, "ratio": norm}
        return scale * (value + c * ref) if c > 0.0 else scale * value

    # The guard has no state of its own: its state dict is the loss network's (same keys), so
    # checkpoints of guarded and unguarded runs are interchangeable.
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return (
            f"min_ratio={self.min_ratio}, max_ratio={self.max_ratio}, "
            f"min_cosine={self.min_cosine}, task={self.task!r}"
        )


def guarded(loss_net: nn.Module, guard: bool | GuardedLoss | None) -> nn.Module:
    """``loss_net`` wrapped in :class:`GuardedLoss` (default bounds) unless ``guard`` is falsy;
    an already guarded loss, or a :class:`GuardedLoss` passed as ``guard``, is used as is."""
    if isinstance(guard, GuardedLoss):
        if guard.net is not loss_net:
            raise ValueError("guard wraps a different loss network than the one given")
        return guard
    if not guard or isinstance(loss_net, GuardedLoss):
        return loss_net
    return GuardedLoss(loss_net)


def loss_value(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    preds: torch.Tensor,
    targets: torch.Tensor,
    loss_params: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``loss_fn(preds, targets)``, with ``loss_params`` substituted via ``functional_forward``."""
    if loss_params is None:
        return loss_fn(preds, targets)
    if not isinstance(loss_fn, nn.Module):
        raise TypeError("loss_params given but the loss is not an nn.Module")
    return functional_forward(loss_fn, loss_params, preds, targets)


def unrolled_step(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    batch: Batch,
    optimizer: InnerSGD,
    state: SGDState | None = None,
    loss_params: Mapping[str, torch.Tensor] | None = None,
    create_graph: bool = True,
) -> tuple[torch.Tensor, Params, SGDState]:
    """One base-optimizer step on the learned loss, kept differentiable.

    Returns ``(base_loss, new_params, new_state)`` with
    ``new_params = opt_step(params, grad_params M(f_params(x), y))``
    (docs/methods/learned-losses.md); with ``create_graph`` the result is differentiable w.r.t.
    the loss network's parameters (second order), including through momentum buffers carried in
    ``state``.
    """
    preds = functional_forward(model, params, batch[0])
    base = loss_value(loss_fn, preds, batch[1], loss_params)
    names = list(params)
    grads = torch.autograd.grad(
        base, [params[k] for k in names], create_graph=create_graph, allow_unused=True
    )
    grads_map = {k: (torch.zeros_like(params[k]) if g is None else g) for k, g in zip(names, grads)}
    new_params, new_state = optimizer.step(dict(params), grads_map, state)
    return base, new_params, new_state


@dataclass
class MetaStepResult:
    """What one meta step produced (losses as floats; ``skipped`` if it was non-finite)."""

    base_loss: float
    meta_loss: float
    skipped: bool = False
    params: Params = field(default_factory=dict, repr=False)


class ML3:
    """Offline loss learning (Bechtle et al. 2020): ``phi <- phi - eta grad_phi L_task(theta')``.

    Args:
        loss_net: the learned loss ``M_phi`` (e.g. :class:`~npbml.losses.LearnedLoss`); its
            parameters are updated by ``meta_optimizer``.
        inner_lr: ``alpha`` of the differentiable inner step(s).
        inner_steps: number of unrolled inner steps per meta step (ML3 uses 1).
        meta_lr: Adam learning rate for ``phi`` (ignored when ``meta_optimizer`` is given).
        meta_objective: ``(predictions, batch, adapted_params) -> scalar``; defaults to CE or MSE
            according to ``task`` (taken from ``loss_net.task`` when present).
        inner_optimizer: the differentiable base optimizer; default plain SGD with ``inner_lr``.
        meta_optimizer: optimizer over ``loss_net.parameters()``; default Adam(``meta_lr``).
        guard: ``True`` (default) meta-trains the loss inside :class:`GuardedLoss` (its step
            bounded against cross-entropy's; train with :attr:`loss` afterwards, or with
            :func:`train_with_loss`, which guards too); a :class:`GuardedLoss` for other
            bounds; ``False`` for the papers' unbounded form.
    """

    def __init__(
        self,
        loss_net: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        meta_lr: float = 1e-3,
        meta_objective: MetaObjective | None = None,
        task: str | None = None,
        inner_optimizer: InnerSGD | None = None,
        meta_optimizer: torch.optim.Optimizer | None = None,
        guard: bool | GuardedLoss = True,
    ) -> None:
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        self.loss_net = loss_net
        net_task: str = getattr(loss_net, "task", "classification")  # LearnedLoss.task: a str
        self.task = task or net_task
        self.inner_steps = int(inner_steps)
        self.inner_optimizer = inner_optimizer or InnerSGD(lr=inner_lr)
        self.meta_objective = meta_objective or default_meta_objective(self.task)
        self.meta_optimizer = meta_optimizer or torch.optim.Adam(loss_net.parameters(), lr=meta_lr)
        self.skipped_steps = 0
        #: The loss the inner steps use: ``loss_net``, guarded unless ``guard=False``.
        self.loss = guarded(loss_net, guard)

    def meta_step(
        self, model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch, meta_batch: Batch
    ) -> MetaStepResult:
        """One ML3 meta step from ``params``; returns the losses and detached ``theta'``.

        A non-finite loss or meta-gradient skips the ``phi`` update (logged, counted in
        :attr:`skipped_steps`) and returns ``params`` unchanged.
        """
        state: SGDState | None = None
        new = dict(params)
        base = torch.zeros(())
        for _ in range(self.inner_steps):
            base, new, state = unrolled_step(
                model, self.loss, new, batch, self.inner_optimizer, state
            )
        preds = functional_forward(model, new, meta_batch[0])
        meta = self.meta_objective(preds, meta_batch, new)
        phis = [p for p in self.loss_net.parameters() if p.requires_grad]
        grads = torch.autograd.grad(meta, phis, allow_unused=True)
        if not all_finite(base, meta, *grads, *new.values()):
            self.skipped_steps += 1
            logger.warning("ML3: non-finite loss or meta-gradient; phi update skipped")
            return MetaStepResult(base.item(), meta.item(), True, {k: v for k, v in params.items()})
        self.meta_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(phis, grads):
            p.grad = None if g is None else g.detach()
        self.meta_optimizer.step()
        detached = {k: v.detach().requires_grad_() for k, v in new.items()}
        return MetaStepResult(base.item(), meta.item(), False, detached)

    def meta_train(
        self,
        make_model: Callable[[], nn.Module],
        batches: Iterable[tuple[Batch, Batch]],
        steps: int,
        reset_every: int | None = 1,
    ) -> list[float]:
        """Run ``steps`` meta steps over ``(train_batch, meta_batch)`` pairs.

        ``reset_every=k`` builds a fresh base model with ``make_model()`` every ``k`` steps (ML3's
        generalisation to new models); ``None`` keeps training one model (theta <- theta'.detach()).
        Returns the meta-loss history.
        """
        history: list[float] = []
        it = iter(batches)
        model = make_model()
        params = model_params(model)
        for s in range(steps):
            if reset_every is not None and s > 0 and s % reset_every == 0:
                model = make_model()
                params = model_params(model)
            try:
                batch, meta_batch = next(it)
            except StopIteration:
                raise ValueError(f"batches ran out after {s} of {steps} meta steps") from None
            result = self.meta_step(model, params, batch, meta_batch)
            params = result.params
            history.append(result.meta_loss)
        return history


def train_with_loss(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[Batch],
    steps: int,
    lr: float,
    optimizer: str = "sgd",
    guard: bool | GuardedLoss = True,
) -> nn.Module:
    """Ordinary training of ``model`` on ``loss_fn`` (learned or not), ``phi`` frozen.

    Used at meta-test time: a learned loss trains a fresh model (ML3 sec IV). ``optimizer`` is
    ``"sgd"`` or ``"adam"``. The loss network's parameters receive no update. A module loss is
    wrapped in :class:`GuardedLoss` unless ``guard=False`` (as :class:`ML3` meta-trains it).
    """
    if isinstance(loss_fn, nn.Module):
        loss_fn = guarded(loss_fn, guard)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    it = iter(batches)
    for _ in range(steps):
        batch = next(it)
        loss = loss_fn(model(batch[0]), batch[1])
        if not math.isfinite(loss.item()):
            logger.warning("train_with_loss: non-finite loss, step skipped")
            continue
        opt.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        for p, g in zip((p for p in model.parameters() if p.requires_grad), grads):
            p.grad = g
        opt.step()
    return model
