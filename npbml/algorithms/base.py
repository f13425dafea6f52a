"""Common machinery of gradient-based meta-learners (the MAML family).

A learner wraps an ordinary ``nn.Module`` and runs the inner loop functionally: the adapted
parameters are a ``{name: tensor}`` dict fed to :func:`torch.func.functional_call`; the module is
never copied or modified. The pieces are pluggable:

- the inner optimizer (``init(params) -> state``, ``step(params, grads, state) -> (params, state)``,
  default :class:`~npbml.inner.InnerSGD`; its learned parts are meta-parameters),
- the inner loss (``loss_fn(logits, targets[, **context])``, see :mod:`npbml.inner.losses`),
- a gradient preconditioner (grads dict -> grads dict, applied by the inner optimizer),
- which parameters adapt (``adapt``) and which are frozen (``freeze``) by fnmatch name patterns.

Parameters matching ``adapt`` (and not ``freeze``) are updated by the inner loop and meta-learned
(their initial values). Parameters matching ``freeze`` are neither adapted nor meta-learned: the
learner sets ``requires_grad=False`` on them (e.g. pre-trained early blocks, docs/methods/npbml.md).
All other parameters (e.g. the ANIL body) are meta-learned but not adapted.

Modes of the inner loop (Finn et al. 2017, eq. 1 and section 5.2):
``"second"`` differentiates through the inner gradients (create_graph), ``"first"`` treats them as
constants (FOMAML: the meta-gradient w.r.t. the initialisation is the query gradient at the adapted
parameters, provided the inner update rule is linear in the initialisation as in plain SGD with
weight_decay=0), ``"none"`` keeps no graph at all (test-time adaptation).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from npbml.algorithms.task_parallel import parallel_task_gradients
from npbml.inner.losses import InnerLoss, accepts_context, call_inner_loss, cross_entropy
from npbml.inner.sgd import InnerSGD, Preconditioner
from npbml.layout import run_channels_last
from npbml.params import Params, functional_forward, match_names, named_params, split_params
from tasks.episode import Episode

__all__ = ["GradientLearner", "Metrics"]

Metrics = dict[str, Any]
_MODES = ("second", "first", "none")


class GradientLearner(nn.Module):
    """MAML-family learner: ``fast = learner.adapt(sx, sy)``; ``logits = learner(qx, fast)``;
    ``loss, metrics = learner.outer_loss(episode)``; ``metrics = learner.evaluate(episode)``.

    Args:
        model: the network (an ordinary ``nn.Module``); its parameters are the initialisation.
        inner_lr: inner-loop rate alpha (ignored when ``inner_optimizer`` is given).
        inner_steps: inner steps J at meta-train time.
        first_order: treat inner gradients as constants (FOMAML).
        eval_inner_steps: inner steps at test time (:meth:`evaluate`); default ``inner_steps``.
        adapt, freeze: fnmatch name patterns, see the module docstring.
        momentum, dampening, nesterov, weight_decay: inner SGD options (torch.optim.SGD semantics).
        inner_loss: the support-set loss, default cross-entropy.
        preconditioner: grads dict -> grads dict hook given to the default inner optimizer.
        inner_optimizer: replaces the default ``InnerSGD`` (leave the SGD options unset).
        channels_last: run the network's convolutions on channels-last (NHWC) tensors
            (:mod:`npbml.layout`): the same values and gradients up to float rounding,
            1.07-1.29x faster per meta-iteration on CPU for learn2learn's OmniglotCNN
            (docs/benchmarks.md). Also settable later as an attribute.
        inner_max_grad_norm: inner-step safeguard: each inner step's gradient is rescaled to at
            most this global L2 norm (a non-finite one becomes a zero step), so no inner loss
            can move the adapted weights by more than ``inner_lr`` times it per step (times the
            momentum gain). Reported as ``metrics["inner_clipped"]``, the fraction of inner
            steps it changed. None (default): off, the plain MAML family.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        first_order: bool = False,
        eval_inner_steps: int | None = None,
        adapt: str | Sequence[str] = ("*",),
        freeze: str | Sequence[str] = (),
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        inner_loss: InnerLoss | None = None,
        preconditioner: Preconditioner | None = None,
        inner_optimizer: Any | None = None,
        channels_last: bool = False,
        inner_max_grad_norm: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.inner_steps = self._check_steps(inner_steps, "inner_steps")
        self.eval_inner_steps = (
            self.inner_steps
            if eval_inner_steps is None
            else self._check_steps(eval_inner_steps, "eval_inner_steps")
        )
        self.first_order = bool(first_order)
        self.inner_lr = float(inner_lr)
        if self.inner_lr < 0:
            raise ValueError(f"inner_lr must be >= 0, got {inner_lr}")
        adapted, rest = split_params(named_params(model), adapt=adapt, freeze=freeze)
        self.adapt_patterns = (adapt,) if isinstance(adapt, str) else tuple(adapt)
        self.freeze_patterns = (freeze,) if isinstance(freeze, str) else tuple(freeze)
        self.adapted_names: list[str] = list(adapted)
        untrainable = [n for n, p in adapted.items() if not p.requires_grad]
        if untrainable:
            raise ValueError(
                f"parameters {untrainable} would be adapted but have requires_grad=False; "
                "add them to freeze= (or re-enable their gradients)"
            )
        frozen = set(match_names(rest, self.freeze_patterns))
        self.frozen_names: list[str] = [n for n in rest if n in frozen]
        # Frozen weights are neither adapted nor meta-learned: no meta-gradient for them.
        for n in self.frozen_names:
            rest[n].requires_grad_(False)
        if inner_optimizer is None:
            inner_optimizer = self.build_inner_optimizer(
                adapted,
                lr=self.inner_lr,
                momentum=momentum,
                dampening=dampening,
                nesterov=nesterov,
                weight_decay=weight_decay,
                preconditioner=preconditioner,
            )
        elif momentum or dampening or nesterov or weight_decay or preconditioner is not None:
            raise ValueError(
                "give either inner_optimizer or the SGD options (momentum, dampening, nesterov, "
                "weight_decay, preconditioner), not both: configure the optimizer you pass instead"
            )
        if not (hasattr(inner_optimizer, "init") and hasattr(inner_optimizer, "step")):
            raise TypeError("inner_optimizer needs init(params) and step(params, grads, state)")
        self.inner_optimizer = inner_optimizer
        self.inner_loss = cross_entropy if inner_loss is None else inner_loss
        self._loss_sig: tuple[Any, bool | tuple[str, ...]] = (None, ())
        self.task_workers = 1
        self.channels_last = bool(channels_last)
        if inner_max_grad_norm is not None and not inner_max_grad_norm > 0:
            raise ValueError(
                f"inner_max_grad_norm must be > 0 (or None for no safeguard), got "
                f"{inner_max_grad_norm}"
            )
        self.inner_max_grad_norm = inner_max_grad_norm
        # [clipped, steps] per thread: task-parallel workers adapt concurrently and each
        # reports only its own tasks (a dict, unlike threading.local, survives deepcopy).
        self._inner_counts: dict[int, list[int]] = {}

    # ----------------------------------------------------------------- construction hooks
    @staticmethod
    def _check_steps(steps: int, name: str) -> int:
        if int(steps) != steps or steps < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {steps!r}")
        return int(steps)

    def build_inner_optimizer(self, adapted: Params, **kwargs: Any) -> Any:
        """The default inner optimizer (subclasses change it, e.g. Meta-SGD's learned rates)."""
        return InnerSGD(**kwargs)

    # ----------------------------------------------------------------- parameters
    def initial_params(self) -> Params:
        """The adapted parameters' initial values theta_0 (the model's own Parameters)."""
        own = dict(self.model.named_parameters())
        return {n: own[n] for n in self.adapted_names}

    def task_initial_params(self, inputs: Any, support_y: torch.Tensor) -> Params:
        """theta_0 of one task, given :meth:`inner_inputs`' output: :meth:`initial_params` by
        default; a subclass may make it depend on the support set (NPBML's prototype head)."""
        return self.initial_params()

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Everything the outer optimizer updates: trainable model parameters (not frozen),
        learned inner-optimizer parts (rates, preconditioner) and learned inner-loss parameters."""
        for n, p in self.named_parameters():
            if p.requires_grad:
                yield n, p

    def meta_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_meta_parameters()]

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """Functional forward of the model with ``params`` (missing entries: the model's own)."""
        return self.run_module(self.model, params, x)

    def run_module(
        self, module: nn.Module, params: Params | None, *args: Any, **kwargs: Any
    ) -> Any:
        """:func:`~npbml.params.functional_forward` of ``module`` (a part of this learner), on
        channels-last tensors when ``self.channels_last``
        (:func:`npbml.layout.run_channels_last`). The one place where the forward passes of this
        class and its subclasses pick the layout."""
        run = run_channels_last if self.channels_last else functional_forward
        return run(module, params, *args, **kwargs)

    def inner_inputs(
        self,
        support_x: torch.Tensor,
        mode: str,
        support_y: torch.Tensor | None = None,
        query_x: torch.Tensor | None = None,
    ) -> Any:
        """What :meth:`inner_objective` consumes; computed once per task (ANIL: body features;
        NPBML: frozen features of ``[S_x; Q_x]`` and relation scores). Never sees query labels."""
        return support_x

    def inner_forward(self, inputs: Any, params: Params) -> torch.Tensor:
        """Support logits at the current adapted parameters."""
        return self.forward(inputs, params)

    def inner_objective(
        self,
        params: Params,
        inputs: Any,
        support_y: torch.Tensor,
        step: int,
        support_x: torch.Tensor,
        query_x: torch.Tensor | None,
    ) -> torch.Tensor:
        """The loss minimised by the inner loop at step ``step`` (override for NPBML's M)."""
        logits = self.inner_forward(inputs, params)
        loss_fn = self.inner_loss
        if self._loss_sig[0] is not loss_fn:  # signature inspected once per loss object
            self._loss_sig = (loss_fn, accepts_context(loss_fn))
        wants = self._loss_sig[1]
        context = None
        if wants:
            context = {
                "params": params,
                "step": step,
                "support_x": support_x,
                "query_x": query_x,
                "learner": self,
            }
        return call_inner_loss(loss_fn, logits, support_y, context or {}, wants)

    # ----------------------------------------------------------------- inner loop
    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        *,
        steps: int | None = None,
        first_order: bool | None = None,
        query_x: torch.Tensor | None = None,
    ) -> Params:
        """Adapted parameters after ``steps`` inner steps on the support set (differentiable
        w.r.t. the meta-parameters; second order unless ``first_order``)."""
        fo = self.first_order if first_order is None else bool(first_order)
        steps = self.inner_steps if steps is None else self._check_steps(steps, "steps")
        return self._adapt(support_x, support_y, steps, "first" if fo else "second", query_x)

    def _adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int,
        mode: str,
        query_x: torch.Tensor | None = None,
    ) -> Params:
        """The inner loop shared by :meth:`adapt`, :meth:`task_loss` and :meth:`evaluate`.

        ``mode``: ``"second"`` (differentiate through the inner gradients), ``"first"``
        (inner gradients are constants) or ``"none"`` (no graph at all, test time). Subclasses
        that need a different unroll override this method with the same signature (NPBML does).
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if support_x.shape[0] != support_y.shape[0]:
            raise ValueError(
                f"support_x has {support_x.shape[0]} examples but support_y has "
                f"{support_y.shape[0]}; pass one task (no leading task dimension) to adapt()"
            )
        track = mode != "none"
        create_graph = mode == "second"
        opt = self.inner_optimizer
        names = self.adapted_names
        with torch.enable_grad():
            inputs = self.inner_inputs(support_x, mode, support_y, query_x)
            params = self.task_initial_params(inputs, support_y)
            if not track:
                params = {n: p.detach() for n, p in params.items()}
            state = opt.init(params)
            for j in range(steps):
                # Off the second-order path the gradient is taken at a detached copy, so the
                # support graph never reaches the meta-parameters (constants, FOMAML).
                p_in = (
                    params
                    if create_graph
                    else {n: p.detach().requires_grad_(True) for n, p in params.items()}
                )
                loss = self.inner_objective(p_in, inputs, support_y, j, support_x, query_x)
                grads = torch.autograd.grad(
                    loss,
                    tuple(p_in.values()),
                    create_graph=create_graph,
                    materialize_grads=True,
                )
                grad_dict = self._safeguard(dict(zip(names, grads)))
                if track:
                    params, state = opt.step(params, grad_dict, state)
                else:
                    with torch.no_grad():
                        params, state = opt.step(params, grad_dict, state)
        return params

    def _safeguard(self, grads: Params) -> Params:
        """Inner-step safeguard: rescale the step's gradient to global L2 norm at most
        ``inner_max_grad_norm`` (no-op when None), so one inner step moves the adapted weights by
        at most ``inner_lr`` times that norm (times the momentum gain) whatever the inner loss;
        a non-finite gradient becomes a skipped (zero) step. Counted per thread;
        :meth:`pop_inner_counts` reads the count."""
        if self.inner_max_grad_norm is None:
            return grads
        norm = torch.linalg.vector_norm(torch.stack([g.detach().norm() for g in grads.values()]))
        counts = self._inner_counts.setdefault(threading.get_ident(), [0, 0])
        counts[1] += 1
        finite = bool(torch.isfinite(norm))
        if finite and not bool(norm > self.inner_max_grad_norm):
            return grads
        counts[0] += 1
        if not finite:
            # A non-finite gradient skips the step instead of spreading NaN into the weights.
            return {n: torch.zeros_like(g) for n, g in grads.items()}
        scale = self.inner_max_grad_norm / norm
        return {n: g * scale for n, g in grads.items()}

    def pop_inner_counts(self) -> tuple[int, int]:
        """``(clipped, steps)``: inner steps the safeguard rescaled, out of all inner steps,
        in this thread since the last call (both 0 without a safeguard); resets them."""
        clipped, steps = self._inner_counts.pop(threading.get_ident(), [0, 0])
        return clipped, steps

    def _add_clip_metric(self, metrics: Metrics, counts: Sequence[tuple[int, int]]) -> Metrics:
        if self.inner_max_grad_norm is not None:
            steps = sum(c[1] for c in counts)
            metrics["inner_clipped"] = sum(c[0] for c in counts) / steps if steps else 0.0
        return metrics

    # ----------------------------------------------------------------- outer loop
    @staticmethod
    def _tasks(episode: Episode) -> list[Episode]:
        if not isinstance(episode, Episode):
            raise TypeError(
                f"expected a tasks.Episode (or a stacked meta-batch), got {type(episode).__name__}"
            )
        return episode.unstack() if episode.is_batched else [episode]

    def task_loss(
        self, task: Episode, mode: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and query logits of one task after adaptation."""
        mode = mode or ("first" if self.first_order else "second")
        fast = self._adapt(task.support_x, task.support_y, self.inner_steps, mode, task.query_x)
        logits = self.forward(task.query_x, fast)
        return F.cross_entropy(logits, task.query_y), logits

    def outer_loss(self, episode: Episode) -> tuple[torch.Tensor, Metrics]:
        """Mean query loss over the tasks of ``episode`` (one task or a meta-batch) after
        adaptation, differentiable w.r.t. the meta-parameters (NPBML's outer rule,
        docs/methods/npbml.md), and metrics ``{"loss": float, "accuracy": float}`` (means over
        tasks)."""
        tasks = self._tasks(episode)
        total: torch.Tensor | None = None
        acc = 0.0
        self.pop_inner_counts()
        for task in tasks:
            loss, logits = self.task_loss(task)
            total = loss if total is None else total + loss
            acc += _accuracy(logits, task.query_y)
        assert total is not None
        mean = total / len(tasks)
        metrics: Metrics = {"loss": float(mean.detach()), "accuracy": acc / len(tasks)}
        return mean, self._add_clip_metric(metrics, [self.pop_inner_counts()])

    def meta_backward(self, episode: Episode, workers: int | None = None) -> Metrics:
        """Same gradient as ``outer_loss(episode)[0].backward()``, but back-propagates each task
        as soon as its loss is known, so only one task's graph is alive at a time (peak memory
        of one task instead of B). Accumulates into ``.grad``; returns the same metrics.

        ``workers`` > 1 runs the tasks on that many CPU threads
        (:mod:`npbml.algorithms.task_parallel`; one task graph alive per thread) and gives the
        bit-identical gradient; default ``self.task_workers`` (1). Use it with one intra-op
        thread per worker (``torch.set_num_threads``), e.g. 2 workers x 1 thread on 2 cores.
        """
        tasks = self._tasks(episode)
        workers = self.task_workers if workers is None else int(workers)
        if workers > 1 and len(tasks) > 1:
            return self._parallel_meta_backward(tasks, workers)
        loss_sum, acc = 0.0, 0.0
        self.pop_inner_counts()
        for task in tasks:
            loss, logits = self.task_loss(task)
            (loss / len(tasks)).backward()
            loss_sum += float(loss.detach())
            acc += _accuracy(logits, task.query_y)
        metrics: Metrics = {"loss": loss_sum / len(tasks), "accuracy": acc / len(tasks)}
        return self._add_clip_metric(metrics, [self.pop_inner_counts()])

    def _parallel_meta_backward(self, tasks: list[Episode], workers: int) -> Metrics:
        params = self.meta_parameters()

        counts: list[tuple[int, int]] = []

        def task_fn(replica: nn.Module, task: Episode) -> tuple[torch.Tensor, float]:
            learner = cast(GradientLearner, replica)  # a replicate() of self: the same class
            learner.pop_inner_counts()
            loss, logits = learner.task_loss(task)
            counts.append(learner.pop_inner_counts())  # list.append is atomic under the GIL
            return loss, _accuracy(logits, task.query_y)

        results = parallel_task_gradients(self, tasks, params, task_fn, workers, divisor=len(tasks))
        return self._parallel_metrics(params, results, len(tasks), counts)

    def _parallel_metrics(
        self,
        params: Sequence[torch.Tensor],
        results: Sequence[tuple[list[torch.Tensor | None], float, float]],
        n: int,
        counts: Sequence[tuple[int, int]],
    ) -> Metrics:
        """Adds the threads' gradients into ``.grad`` and returns the mean loss/accuracy over
        ``n`` tasks (``results`` of :func:`parallel_task_gradients`, summed per task or chunk)."""
        # Added in task order: the float operations of the sequential per-task backward.
        with torch.no_grad():
            for j, p in enumerate(params):
                for grads, _, _ in results:
                    g = grads[j]
                    if g is not None:
                        p.grad = g.clone() if p.grad is None else p.grad + g
        metrics: Metrics = {
            "loss": sum(r[1] for r in results) / n,
            "accuracy": sum(r[2] for r in results) / n,
        }
        return self._add_clip_metric(metrics, counts)

    def evaluate(self, episode: Episode, inner_steps: int | None = None) -> Metrics:
        """Test-time adaptation (no meta-gradient, no graph kept) with ``inner_steps``
        (default ``eval_inner_steps``). Returns mean ``loss``/``accuracy``, per-task
        ``losses``/``accuracies`` lists and ``max_abs_logit``, the largest adapted query logit
        (``inf`` if one is non-finite: a diverged inner loop shows here)."""
        steps = (
            self.eval_inner_steps
            if inner_steps is None
            else self._check_steps(inner_steps, "inner_steps")
        )
        losses: list[float] = []
        accs: list[float] = []
        peak = 0.0
        self.pop_inner_counts()
        for task in self._tasks(episode):
            fast = self._adapt(task.support_x, task.support_y, steps, "none", task.query_x)
            with torch.no_grad():
                logits = self.forward(task.query_x, fast)
                losses.append(float(F.cross_entropy(logits, task.query_y)))
                top = logits.abs().max()
                peak = max(peak, float(top) if bool(torch.isfinite(top)) else math.inf)
            accs.append(_accuracy(logits, task.query_y))
        n = len(accs)
        metrics: Metrics = {
            "loss": sum(losses) / n,
            "accuracy": sum(accs) / n,
            "losses": losses,
            "accuracies": accs,
            "max_abs_logit": peak,
        }
        return self._add_clip_metric(metrics, [self.pop_inner_counts()])


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.detach().argmax(dim=-1) == targets).float().mean())
