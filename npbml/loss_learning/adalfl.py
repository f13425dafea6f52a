"""AdaLFL: online loss-function learning (Raymond et al., arXiv 2301.13247).

Method page: docs/methods/learned-losses.md.

Phase 1 (offline): initialise ``phi`` with ML3-style unrolled steps (:meth:`AdaLFL.offline_init`).
Phase 2 (online): after every base update of the ordinary training run (:meth:`AdaLFL.step`)::

    theta_{t+1} = opt_step(theta_t, grad_theta M_phi_t(batch_t))        (differentiable, 1 step)
    phi_{t+1}   = phi_t - eta * grad_phi L_task(batch'_t; theta_{t+1})
    theta_{t+1} <- theta_{t+1}.detach()

``opt_step`` is the step of a ``torch.optim`` optimizer (the user's own, ``optimizer=``; by default
SGD with Nesterov momentum 0.9 and weight decay 5e-4), looked ahead differentiably by
:class:`npbml.inner.TorchOptimStep` from the optimizer's own state, then applied by the optimizer's
own ``step()``, so its momentum buffers (or Adam moments) are never dropped or desynchronised and a
scheduler on its ``param_groups`` reaches both. ``horizon="momentum"`` looks ahead to where the
optimizer's momentum will carry the weights instead of the next step only (this toolkit's option;
see :mod:`npbml.inner.torch_optim`). ``batch'`` is the next training batch (``meta_batch="next"``,
default) or a held-out validation batch (``"validation"``); the sources do not settle which one. A
third option, ``"same"`` (``batch' = batch_t``), is what ML3's reference code does (the task loss
after the differentiable step is computed on the step's own batch:
facebookresearch/LearningToLearn, ``ml3/mnist_task.py``); for AdaLFL it is this toolkit's option,
not the paper's. With many classes a class occurs about once per batch (242 classes, batch 128:
0.53 times), so a one-step meta-objective on another batch mostly rewards class-agnostic changes
such as shrinking every logit toward uniform predictions (measured in ``docs/results.md``, loss
comparison).

Many classes (a design limitation, not a bug): the loss network reads softmax probabilities, so
its gradient w.r.t. the logits is ``p_k (g'_k - sum_c p_c g'_c)`` -- ``O(1/C)`` while the
predictions are near uniform. On 242 classes a freshly initialised 2-50-50-1 network gives
gradients 1e-4 (PyTorch init) to 1e-3 (Kaiming init, the reference code's) of cross-entropy's,
so the first updates barely move the model and the meta-learner must first grow the slope gap
``g'(p, 1) - g'(p, 0)`` near ``p = 1/C`` by orders of magnitude. The sum over classes (not a mean)
is the reference behaviour and already the larger of the two. Measurements and the defaults
chosen for ``npbml fit`` are in ``docs/results.md`` (loss comparison). This toolkit's options
``LearnedLoss(inputs="log_prob")``, :func:`npbml.loss_learning.regress_to_cross_entropy` (a CE
warm start) and ``meta_batch="same"`` remove both many-class problems; none is the paper's form.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from npbml.inner import InnerSGD, SGDState
from npbml.inner.torch_optim import HORIZONS, Horizon, TorchOptimStep
from npbml.loss_learning.ml3 import (
    ML3,
    Batch,
    GuardedLoss,
    MetaObjective,
    default_meta_objective,
    guarded,
    loss_value,
    unrolled_step,
)
from npbml.losses.learned import all_finite, restore_parameters, snapshot_parameters
from npbml.params import functional_forward

logger = logging.getLogger(__name__)

META_BATCHES = ("next", "validation", "same")

#: AdaLFL's default :class:`GuardedLoss` bounds: the step keeps CE's logit-gradient norm and a
#: cosine of at least 0.5 with CE's gradient (docs/losses.md, "Why AdaLFL drifted").
DEFAULT_GUARD: dict[str, float] = {"min_ratio": 1.0, "max_ratio": 1.0, "min_cosine": 0.5}


def default_guard(loss_net: nn.Module) -> GuardedLoss:
    """``loss_net`` inside :class:`GuardedLoss` with AdaLFL's :data:`DEFAULT_GUARD` bounds."""
    g = DEFAULT_GUARD
    return GuardedLoss(loss_net, g["min_ratio"], g["max_ratio"], min_cosine=g["min_cosine"])


def adalfl_meta_loss(
    model: nn.Module,
    loss_net: nn.Module,
    params: Mapping[str, torch.Tensor],
    batch: Batch,
    meta_batch: Batch,
    optimizer: InnerSGD,
    state: SGDState | None,
    meta_objective: MetaObjective,
    loss_params: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], SGDState]:
    """The AdaLFL meta-objective of one online step, as a pure function.

    Returns ``(meta_loss, base_loss, theta_{t+1}, state_{t+1})`` where ``meta_loss =
    L_task(f_{theta_{t+1}}(x'), y')`` is differentiable w.r.t. ``phi`` (``loss_params`` when
    given, else ``loss_net``'s own parameters) through the base optimizer step and its momentum.
    """
    base, new_params, new_state = unrolled_step(
        model, loss_net, params, batch, optimizer, state, loss_params
    )
    preds = functional_forward(model, new_params, meta_batch[0])
    return meta_objective(preds, meta_batch, new_params), base, new_params, new_state


@dataclass
class AdaLFLStep:
    """Outcome of one :meth:`AdaLFL.step`.

    ``base_loss`` is the learned loss's value, whose scale is arbitrary; ``ce`` is the
    cross-entropy of the same predictions (NaN for regression), the number to read as the
    training loss. ``grad_ratio`` and ``grad_cosine`` compare the learned loss's gradient
    w.r.t. the logits with cross-entropy's on the batch: their norms' ratio and the cosine
    between them (NaN for regression).
    """

    base_loss: float
    meta_loss: float
    skipped: bool
    ce: float = float("nan")
    grad_ratio: float = float("nan")
    grad_cosine: float = float("nan")


class AdaLFL:
    """Online loss learning for a user's own training loop.

    Example::

        adalfl = AdaLFL(model, LearnedLoss(), base_lr=0.01)
        adalfl.offline_init(pairs_of_batches, steps=100)      # phase 1 (optional)
        for batch, next_batch in zip(batches, batches[1:]):   # phase 2
            base_loss, meta_loss = adalfl.step(batch, next_batch)

    The model's parameters are updated in place (after the step they are detached leaves again);
    its buffers (BatchNorm statistics) are updated by both forward passes of a step.

    Robustness: if the base loss, the meta loss, the new parameters or the meta-gradient are
    non-finite, nothing is applied to the model or its optimizer state, the step is logged and
    counted in :attr:`skipped_steps`, the loss network is reset to its last good parameters (those
    of the last successful step) and the meta-optimizer's state is cleared.

    Args:
        model: the base model ``f_theta`` (trained in place).
        loss_net: the learned loss ``M_phi``.
        base_lr, momentum, nesterov, weight_decay: the base SGD built when ``optimizer`` is not
            given (defaults 0.01, 0.9, True, 5e-4); ignored otherwise.
        meta_lr: Adam learning rate of ``phi`` (default 1e-3).
        meta_batch: ``"next"`` (the next training batch), ``"validation"`` or ``"same"`` (the
            step's own batch; used when :meth:`step` gets no meta batch).
        validation_batches: an iterable cycled for the meta batch when ``step`` gets none (needed
            for ``meta_batch="validation"`` unless batches are passed explicitly).
        meta_objective: ``(predictions, batch, params) -> scalar``; default CE / MSE by task.
        meta_optimizer: optimizer over ``loss_net.parameters()``; default Adam(``meta_lr``).
        guard: ``True`` (default): every base step uses the loss inside
            :class:`~npbml.loss_learning.ml3.GuardedLoss` with both bounds 1 and
            ``min_cosine=0.5`` (:data:`DEFAULT_GUARD`): its logit gradient has exactly CE's norm
            on every batch and stays within 60 degrees of CE's direction, so the meta-learner
            shapes the loss but cannot turn it into a learning-rate multiplier (the one-step
            meta-objective drives that scale up under momentum and down without it;
            docs/losses.md, "Why AdaLFL drifted") nor point it away from the labels; a
            :class:`GuardedLoss` for other bounds; ``False`` for the paper's unbounded form.
        optimizer: the base optimizer, a :class:`torch.optim.SGD`, :class:`~torch.optim.Adam`
            or :class:`~torch.optim.AdamW` over ``model.parameters()``; the meta-objective looks
            ahead through its step and the base update is its own ``step()``.
        horizon: ``"step"`` (the paper's one-step look-ahead) or ``"momentum"`` (the step plus
            the displacement the optimizer's momentum will still add;
            :class:`~npbml.inner.TorchOptimStep`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_net: nn.Module,
        base_lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        meta_lr: float = 1e-3,
        meta_batch: str = "next",
        validation_batches: Iterable[Batch] | None = None,
        task: str | None = None,
        meta_objective: MetaObjective | None = None,
        meta_optimizer: torch.optim.Optimizer | None = None,
        guard: bool | GuardedLoss = True,
        optimizer: torch.optim.Optimizer | None = None,
        horizon: Horizon = "step",
    ) -> None:
        if meta_batch not in META_BATCHES:
            raise ValueError(f"meta_batch must be one of {META_BATCHES}, got {meta_batch!r}")
        self.model = model
        self.loss_net = loss_net
        net_task: str = getattr(loss_net, "task", "classification")  # LearnedLoss.task: a str
        self.task = task or net_task
        #: The loss of the base steps: ``loss_net`` in :data:`DEFAULT_GUARD`'s bounds, unless
        #: ``guard`` says otherwise.
        self.loss = guarded(loss_net, default_guard(loss_net) if guard is True else guard)
        self.optimizer = optimizer or torch.optim.SGD(
            model.parameters(),
            lr=base_lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
        )
        if horizon not in HORIZONS:
            raise ValueError(f"horizon must be one of {HORIZONS}, got {horizon!r}")
        self.look_ahead = TorchOptimStep(self.optimizer, model, horizon)
        self.meta_batch = meta_batch
        self._validation_source = validation_batches
        self._validation_iter: Iterator[Batch] | None = None
        self.meta_objective = meta_objective or default_meta_objective(self.task)
        self.meta_optimizer = meta_optimizer or torch.optim.Adam(loss_net.parameters(), lr=meta_lr)
        self.skipped_steps = 0
        self.steps = 0
        self._last_good = snapshot_parameters(loss_net)

    def _offline_sgd(self) -> InnerSGD:
        """The unrolled SGD of the offline phase, built from :attr:`optimizer`'s first group at
        call time (plain SGD at that group's ``lr`` for Adam/AdamW). There is no separate base
        optimizer to configure: the learning rate lives in :attr:`optimizer`'s
        ``param_groups`` (:meth:`set_base_lr`, or any scheduler)."""
        g = self.optimizer.param_groups[0]
        if not isinstance(self.optimizer, torch.optim.SGD):
            return InnerSGD(lr=float(g["lr"]))
        return InnerSGD(
            lr=float(g["lr"]),
            momentum=g["momentum"],
            dampening=g["dampening"],
            nesterov=g["nesterov"],
            weight_decay=g["weight_decay"],
        )

    @property
    def opt_state(self) -> SGDState:
        """The base optimizer's momentum buffers (SGD) by parameter name; read-only view."""
        state = self.optimizer.state
        return {
            k: state[p]["momentum_buffer"]
            for k, p in self.model.named_parameters()
            if state.get(p, {}).get("momentum_buffer") is not None
        }

    def set_base_lr(self, lr: float) -> None:
        """Set every parameter group's learning rate (for schedules); optimizer state is kept.
        A scheduler acting on :attr:`optimizer` does the same."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)

    # -- phase 1 -----------------------------------------------------------------------------
    def offline_init(
        self,
        batches: Iterable[tuple[Batch, Batch]],
        steps: int,
        reset_every: int | None = None,
    ) -> list[float]:
        """ML3-style offline initialisation of ``phi`` for ``steps`` (S_init) meta steps.

        Runs on a deep copy of the model with the same (unrolled) base optimizer, so the model
        being trained is not touched. ``batches`` yields ``(train_batch, meta_batch)`` pairs.
        Returns the meta-loss history.
        """
        start = copy.deepcopy(self.model)
        ml3 = ML3(
            self.loss_net,
            meta_objective=self.meta_objective,
            task=self.task,
            inner_optimizer=self._offline_sgd(),
            meta_optimizer=self.meta_optimizer,
            guard=self.loss if isinstance(self.loss, GuardedLoss) else False,
        )
        history = ml3.meta_train(lambda: copy.deepcopy(start), batches, steps, reset_every)
        self._last_good = snapshot_parameters(self.loss_net)
        return history

    # -- phase 2 -----------------------------------------------------------------------------
    def _next_validation_batch(self) -> Batch:
        if self._validation_source is None:
            raise ValueError(
                "AdaLFL.step needs a meta batch: pass step(batch, meta_batch) (the next training "
                "batch for meta_batch='next') or give validation_batches= to AdaLFL"
            )
        if self._validation_iter is None:
            self._validation_iter = iter(self._validation_source)
        try:
            return next(self._validation_iter)
        except StopIteration:
            self._validation_iter = iter(self._validation_source)
            return next(self._validation_iter)

    def _look_ahead(
        self, batch: Batch, meta_batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], AdaLFLStep]:
        """``(meta_loss, base_loss, grads, diagnostics)`` of the look-ahead from the current
        weights; ``grads`` (by parameter name) keep their graph to the loss network."""
        params = {
            k: v.detach().requires_grad_()
            for k, v in self.model.named_parameters()
            if v.requires_grad
        }
        preds = functional_forward(self.model, params, batch[0])
        base = loss_value(self.loss, preds, batch[1])
        names = list(params)
        raw = torch.autograd.grad(
            base, [preds, *(params[k] for k in names)], create_graph=True, allow_unused=True
        )
        # A parameter the loss does not reach gets no gradient, as in plain torch training: the
        # optimizer then leaves it (and its state) alone in the look-ahead and the real step.
        grads = {k: g for k, g in zip(names, raw[1:]) if g is not None}
        ahead = self.look_ahead.step(params, grads)
        meta_preds = functional_forward(self.model, ahead, meta_batch[0])
        meta = self.meta_objective(meta_preds, meta_batch, ahead)
        info = AdaLFLStep(base.item(), meta.item(), False)
        if self.task == "classification" and raw[0] is not None:
            info.ce, info.grad_ratio, info.grad_cosine = _against_ce(preds, batch[1], raw[0])
        return meta, base, grads, info

    def step(self, batch: Batch, meta_batch: Batch | None = None) -> tuple[float, float]:
        """One online AdaLFL step; returns ``(base_loss, meta_loss)`` (NaN-free unless skipped).

        Whether it was skipped, the batch's cross-entropy and the logit-gradient comparison
        with cross-entropy are in :attr:`last_step`.
        """
        if meta_batch is None:
            same = self.meta_batch == "same"
            meta_batch = batch if same else self._next_validation_batch()
        meta, base, grads, info = self._look_ahead(batch, meta_batch)
        phis = [p for p in self.loss_net.parameters() if p.requires_grad]
        meta_grads = torch.autograd.grad(meta, phis, allow_unused=True)
        self.steps += 1
        if not all_finite(base, meta, *meta_grads, *grads.values()):
            self.skipped_steps += 1
            logger.warning(
                "AdaLFL step %d: non-finite loss/gradient/meta-gradient; base step skipped and "
                "loss network reset to its last good parameters",
                self.steps,
            )
            restore_parameters(self.loss_net, self._last_good)
            self.meta_optimizer.state.clear()
            info.skipped = True
            self.last_step = info
            return info.base_loss, info.meta_loss
        # These phi produced a finite step: they become the rollback point.
        self._last_good = snapshot_parameters(self.loss_net)
        self.meta_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(phis, meta_grads):
            p.grad = None if g is None else g.detach()
        self.meta_optimizer.step()
        # The base update is the optimizer's own step on the gradient the look-ahead used.
        self.optimizer.zero_grad(set_to_none=True)
        for k, p in self.model.named_parameters():
            if k in grads:
                p.grad = grads[k].detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_step = info
        return info.base_loss, info.meta_loss

    def train_epoch(
        self, batches: Iterable[Batch], callback: Callable[[int, AdaLFLStep], Any] | None = None
    ) -> list[AdaLFLStep]:
        """Step over ``batches``; with ``meta_batch="next"`` batch ``t+1`` is step ``t``'s meta
        batch (the last batch of the epoch is its own meta batch)."""
        out: list[AdaLFLStep] = []
        it = iter(batches)
        current = next(it, None)
        while current is not None:
            following = next(it, None)
            if self.meta_batch == "next":
                self.step(current, following if following is not None else current)
            elif self.meta_batch == "same":
                self.step(current, current)
            else:
                self.step(current)
            out.append(self.last_step)
            if callback is not None:
                callback(self.steps, self.last_step)
            current = following
        return out

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: loss network, meta- and base optimizer, counters."""
        return {
            "loss_net": self.loss_net.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "last_good": dict(self._last_good),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the model's own weights are restored separately)."""
        self.loss_net.load_state_dict(state["loss_net"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._last_good = dict(state["last_good"])
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])


def _against_ce(
    preds: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor
) -> tuple[float, float, float]:
    """``(CE, |g| / |g_CE|, cos(g, g_CE))`` of a loss gradient ``g`` w.r.t. the logits, with
    ``g_CE = (softmax(z) - onehot(y)) / N``, the gradient of the batch-mean cross-entropy."""
    with torch.no_grad():
        z = preds.detach()
        ce = F.cross_entropy(z, targets)
        g_ce = (torch.softmax(z, -1) - F.one_hot(targets, z.shape[-1]).to(z.dtype)) / len(z)
        g = grad.detach().flatten()
        g_ce = g_ce.flatten()
        n, n_ce = g.norm(), g_ce.norm()
        cos = torch.dot(g, g_ce) / (n * n_ce).clamp_min(1e-30)
        return float(ce), float(n / n_ce.clamp_min(1e-30)), float(cos)
