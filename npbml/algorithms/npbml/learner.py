"""NPBML: meta-learned initialisation, preconditioned optimizer and task-adaptive loss.

Raymond et al., "Meta-Learning Neural Procedural Biases", arXiv 2406.07983 (docs/methods/npbml.md).
Meta-parameters ``Phi = {theta (init), omega (warps), phi (loss), psi (FiLM)}``.

    inner:  theta_{j+1} = theta_j - alpha * P(omega, psi) grad_theta M(phi, psi)(S, Q_x; theta_j)
    outer:  Phi <- Phi - eta (1/B) sum_i grad_Phi L_CE(Q_i; theta_{i,J}(Phi))   (second order)

Pieces (each an ``nn.Module`` of its own, usable elsewhere):

* theta: the backbone (``model.blocks``, ``model.head``) wrapped by reference in
  :class:`NPBMLNetwork` (no copies), plus the permutation-invariant head init :class:`HeadRow`:
  all ``N`` head rows start from one meta-learned row. The rows are *expanded* from it, so the
  meta-gradient reaches it (sum of the per-row gradients); the reference code writes through
  ``.data`` and loses it.
* omega: :class:`~.layers.warp.WarpLayer` after the blocks in ``warp_after`` (default the last);
  never updated by the inner loop, so ``P`` is the induced preconditioner ``Omega Omega^T``.
* phi: :class:`~.layers.task_loss.TaskAdaptiveLoss` ``M = CE + L_S + L_Q + R``.
* psi: FiLM generators on the non-frozen encoder blocks, in the warps and in the loss MLPs.

Inner loop: forward on ``[S_x; Q_x]`` together (BatchNorm statistics over both; ``joint_forward``),
final query prediction on ``Q_x`` alone; SGD with Nesterov momentum 0.9 and weight decay 5e-4,
lr 0.01, J = 5 by default (reference code), plain SGD with ``momentum=0, weight_decay=0``
(the paper's equation). Frozen leading blocks (neither adapted nor meta-learned) are run once per
episode without a graph. Query labels are never seen by the inner loop: ``_adapt`` receives only
``support_x, support_y, query_x``.

Ablations (paper Tables 3 and 4) are keyword presets in
:data:`~npbml.algorithms.npbml.options.ABLATIONS`, e.g. ``NPBML(model, ablation="+optimizer")``.

Stability (a deviation; the paper is silent): the learned loss reads bounded inputs and every
inner step passes the gradient-norm safeguard (``NPBMLOptions.inner_max_grad_norm``), so a loss
network of any weight scale moves the adapted weights by a bounded amount per step
(:mod:`npbml.algorithms.npbml.layers.task_loss`, docs/npbml.md).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from npbml.algorithms.base import GradientLearner, Metrics, _accuracy
from npbml.algorithms.npbml.batched import batchable, batched_query_logits
from npbml.algorithms.npbml.cache import EpisodeCache
from npbml.algorithms.npbml.layers.film import unfoldable_conv
from npbml.algorithms.npbml.layers.task_loss import TaskAdaptiveLoss, one_hot
from npbml.algorithms.npbml.layers.unfold import Unfolded, unfold_input
from npbml.algorithms.npbml.network import NPBMLNetwork, adapt_and_freeze, block_frozen
from npbml.algorithms.npbml.options import NPBMLOptions
from npbml.algorithms.task_parallel import parallel_task_gradients
from npbml.layout import run_channels_last
from npbml.params import Params, named_params, split_params
from tasks.episode import Episode

#: Largest ratio (patch elements / activation elements) at which the first adapted conv's input
#: is unfolded once per episode (:meth:`NPBML.unfold_adapted_input`): 2.25 for a 3x3 stride-2
#: conv, 9 for stride 1. Measured in docs/benchmarks.md (issue 13).
UNFOLD_MAX_GROWTH = 4.0

__all__ = ["NPBML", "nonfinite_gradients"]


def nonfinite_gradients(module: nn.Module) -> list[str]:
    """Names of parameters whose ``.grad`` holds a NaN or infinity (empty: all finite).

    For the training loop's skip-the-step guard: call after ``backward()``, before
    ``optimizer.step()``."""
    return [
        n
        for n, p in module.named_parameters()
        if p.grad is not None and not bool(p.grad.isfinite().all())
    ]


class NPBML(GradientLearner):
    """Neural Procedural Bias Meta-Learning (Raymond et al., arXiv 2406.07983).

    Same interface as :class:`~npbml.algorithms.MAML`: ``fast = learner.adapt(sx, sy, query_x=qx)``,
    ``logits = learner(qx, fast)``, ``loss, metrics = learner.outer_loss(episode)``,
    ``learner.evaluate(episode)``, ``learner.meta_parameters()``.

    Args:
        model: backbone with ``blocks`` and a linear ``head`` (``N = head.out_features`` ways).
        options: every NPBML-specific setting (:class:`NPBMLOptions`, the single source of the
            defaults: adapted set, inner SGD, safeguard, FiLM, warps, loss terms, ablation).
        inner_lr, inner_steps, eval_inner_steps, first_order: as MAML (reference: 0.01, 5).
        relation_net: frozen relation network (``(sx, sy, qx, ways) -> [Q, N]``), required by
            the ``"query"`` term; its parameters get ``requires_grad=False``.
        checkpoints_loaded: set by :func:`~npbml.algorithms.npbml.build_npbml` once it has
            loaded the checkpoints the options name (otherwise naming one is an error).
        **overrides: fields of :class:`NPBMLOptions` replacing those of ``options``, e.g.
            ``NPBML(model, **ABLATIONS["+optimizer+loss"])``.

    The learner reads no files: :func:`~npbml.algorithms.npbml.build_npbml` loads the backbone
    and relation checkpoints named in the options, then builds it.
    """

    def __init__(
        self,
        model: nn.Module,
        options: NPBMLOptions | None = None,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        first_order: bool = False,
        eval_inner_steps: int | None = None,
        relation_net: nn.Module | None = None,
        checkpoints_loaded: bool = False,
        **overrides: Any,
    ) -> None:
        opts = NPBMLOptions.from_kwargs(options, **overrides).resolved()
        named = opts.backbone_checkpoint or opts.relation_checkpoint
        if named and not checkpoints_loaded:
            raise ValueError(
                "NPBML reads no files, but its options name a checkpoint (backbone_checkpoint / "
                "relation_checkpoint): build it with npbml.algorithms.npbml.build_npbml(model, "
                "...) or build_algorithm('npbml', model, ...), which load them first"
            )
        terms = tuple(opts.loss_terms)
        if "query" in terms and relation_net is None:
            raise ValueError(
                "the transductive loss term 'query' needs relation_net= (a pre-trained, frozen "
                "npbml.algorithms.npbml.layers.relation.RelationNetwork; build_npbml loads "
                "relation_checkpoint= for you, "
                "written by `npbml pretrain-relation`); pass one or drop 'query' from loss_terms"
            )
        network, adapt_p, freeze_p = _build_network(model, opts)
        adapted = _adapted_names(network, adapt_p, freeze_p)
        super().__init__(
            network,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            first_order=first_order,
            eval_inner_steps=eval_inner_steps,
            adapt=adapt_p,
            freeze=freeze_p,
            momentum=opts.momentum,
            dampening=opts.dampening,
            nesterov=opts.nesterov,
            weight_decay=opts.weight_decay,
            inner_loss=_build_task_loss(network, opts, adapted),
            inner_max_grad_norm=opts.inner_max_grad_norm,
        )
        self.adapted_names = adapted
        self.options = opts
        self.relation_net = relation_net if "query" in terms else None
        if self.relation_net is not None:
            for p in self.relation_net.parameters():
                p.requires_grad_(False)
        self.loss_terms = terms
        self.joint_forward = bool(opts.joint_forward)
        self.ways = network.head.out_features
        self.frozen_prefix = self._count_frozen_prefix()
        self._check_relation_reads()
        self.episode_cache = EpisodeCache(opts.episode_cache)
        #: :meth:`unfold_adapted_input`'s limit; 0 never unfolds (the same math either way).
        self.unfold_max_growth = UNFOLD_MAX_GROWTH

    # ----------------------------------------------------------------- structure
    @property
    def network(self) -> NPBMLNetwork:
        """The wrapped network (``self.model``; not registered twice, so one state_dict entry)."""
        return self.model  # type: ignore[return-value]

    def _count_frozen_prefix(self) -> int:
        """Number of leading blocks with nothing adapted or meta-learned in them (or their FiLM
        and warp): their activations are computed once per episode, without a graph."""
        adapted = set(self.adapted_names)
        k = 0
        for i in range(len(self.network.blocks)):
            prefixes = (f"blocks.{i}.", f"films.{i}.", f"warps.{i}.")
            live = [
                n
                for n, p in self.network.named_parameters()
                if n.startswith(prefixes) and (p.requires_grad or n in adapted)
            ]
            if live:
                break
            k += 1
        return k

    @property
    def relation_reads_features(self) -> bool:
        """Whether the relation network scores the frozen-block features NPBML computes anyway
        (``RelationNetwork(reads="features")``) instead of embedding the images itself."""
        return getattr(self.relation_net, "reads", "images") == "features"

    def _check_relation_reads(self) -> None:
        """A features-reading relation network must have been trained on the features of
        exactly this learner's frozen blocks."""
        if not self.relation_reads_features:
            return
        made_by = getattr(self.relation_net, "feature_blocks", None)
        if made_by != self.frozen_prefix:
            raise ValueError(
                f"the relation network reads the features of the first {made_by} backbone "
                f"blocks, but this NPBML freezes the first {self.frozen_prefix}; pre-train it "
                f"with `npbml pretrain-relation --backbone CKPT --feature-blocks "
                f"{self.frozen_prefix}`, or use an image relation network"
            )

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """As the base class, less the head's own tensors when the head row replaces them
        (they are placeholders, see :class:`NPBMLNetwork`; the user's model is not modified)."""
        replaced = self.network.head_row is not None or self.options.head_init == "proto"
        skip = ("model.head.",) if replaced else ()
        for n, p in super().named_meta_parameters():
            if not (skip and n.startswith(skip)):
                yield n, p

    @property
    def task_loss_fn(self) -> TaskAdaptiveLoss | None:
        """The learned loss M, or None for plain CE."""
        return self.inner_loss if isinstance(self.inner_loss, TaskAdaptiveLoss) else None

    def head_params(self) -> Params:
        """``{"head.weight", "head.bias"}`` at initialisation (expanded from the head row)."""
        row = self.network.head_row
        if row is None:
            return {"head.weight": self.network.head.weight, "head.bias": self.network.head.bias}
        w, b = row.expand()
        return {"head.weight": w, "head.bias": b}

    def initial_params(self) -> Params:
        own: Params = dict(self.network.named_parameters())
        own.update(self.head_params())
        return {n: own[n] for n in self.adapted_names}

    def task_initial_params(self, inputs: Any, support_y: torch.Tensor) -> Params:
        """theta_0 of one task. With ``head_init="proto"`` the head starts as the nearest-
        prototype classifier of the support features (Proto-MAML, Triantafillou et al. 2020,
        eq. 3): ``W_c = 2 c_c``, ``b_c = -||c_c||^2`` with ``c_c`` the mean support feature of
        class ``c`` at the initial weights, so the logits before any inner step are the negative
        squared Euclidean distances up to a per-example constant; differentiable, so the
        meta-gradient reaches the body through the prototypes."""
        params = self.initial_params()
        if self.options.head_init != "proto":
            return params
        h0, _, n_s, _ = inputs
        h = self.run_module(self.network, params, h0, self.frozen_prefix, None, method="run_blocks")
        feats = self.network.reduce(h)[:n_s]
        onehot = one_hot(support_y, self.ways, feats.dtype)
        protos = onehot.t() @ feats / onehot.sum(0).clamp_min(1).unsqueeze(1)
        # The head descends from the body's initial tensors, but the inner gradient is the
        # partial derivative w.r.t. each adapted tensor: hand the body on as new graph nodes
        # (views) that the head does not descend from. Otherwise autograd.grad w.r.t. a body
        # tensor adds the path through the prototypes (the total derivative), and the
        # second-order inner loop differs from the first-order and test-time ones (found by
        # tests/test_npbml_batched.py; the batched path takes partials by construction).
        body = {n: t.view_as(t) for n, t in params.items()}
        return {**body, "head.weight": 2 * protos, "head.bias": -protos.pow(2).sum(1)}

    def _with_head(self, params: Params | None) -> Params:
        if self.network.head_row is None:
            return dict(params or {})
        return {**self.head_params(), **(params or {})}

    def forward(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """Logits of ``x`` (raw inputs) at ``params`` (missing entries: the initialisation).

        The frozen leading blocks run through :meth:`frozen_features` (no graph, their fast
        layout) unless ``x`` itself needs a gradient: nothing in them is adapted or
        meta-learned, so the result and every meta-gradient are the same."""
        if self.frozen_prefix and not x.requires_grad:
            return self.forward_from(self.query_features(x), params, self.frozen_prefix)
        return self.run_module(self.network, self._with_head(params), x)

    def forward_from(
        self, h: torch.Tensor | Unfolded, params: Params | None, start: int
    ) -> torch.Tensor:
        """Logits from the input ``h`` of block ``start`` (e.g. precomputed frozen features)."""
        return self.run_module(self.network, self._with_head(params), h, start=start)

    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the frozen leading blocks (no graph); ``x`` itself if there are none.

        On CPU this no-grad pass always runs channels-last (:mod:`npbml.layout`; 3.3x faster for
        Conv4-32 at 28x28, mostly max-pooling, docs/benchmarks.md) and hands its output back in
        the learner's own layout: the adapted blocks' tiny activations are faster NCHW, so the
        layout must not leak into the inner loop. A layout changes rounding only."""
        if not self.frozen_prefix:
            return x
        if x.device.type != "cpu" or self.channels_last:
            return self.run_module(
                self.network, None, x, 0, self.frozen_prefix, method="run_blocks"
            )
        h = run_channels_last(self.network, None, x, 0, self.frozen_prefix, method="run_blocks")
        return h.contiguous()

    def query_features(self, x: torch.Tensor) -> torch.Tensor | Unfolded:
        """:meth:`frozen_features` of the final query forward, unfolded where that pays
        (:meth:`unfold_adapted_input`); from :attr:`episode_cache` when no gradient is being
        recorded (test time), as the same queries come back at every validation."""
        if torch.is_grad_enabled():
            return self.unfold_adapted_input(self.frozen_features(x))
        return self.episode_cache.get(
            "query",
            (x,),
            self._frozen_tensors(),
            lambda: self.unfold_adapted_input(self.frozen_features(x)),
        )

    def unfold_adapted_input(self, h: torch.Tensor) -> torch.Tensor | Unfolded:
        """``h``, the input of the first adapted block, with its patches for the block's first
        convolution (:mod:`.layers.unfold`) where that pays: the block has one
        (:func:`~.layers.film.unfoldable_conv`), on CPU, NCHW, and the patches are at most
        :attr:`unfold_max_growth` times the size of ``h``. ``h`` is fixed through the inner loop, so
        it is unfolded once per episode instead of at every step (issue 13)."""
        first = self.frozen_prefix  # the first adapted block; h is its input
        if self.channels_last or h.device.type != "cpu" or not 0 < first < len(self.network.blocks):
            return h
        conv = unfoldable_conv(self.network.blocks[first])
        if conv is None or h.dim() != 4:
            return h
        growth = conv.kernel_size[0] * conv.kernel_size[1] / (conv.stride[0] * conv.stride[1])
        return unfold_input(conv, h) if growth <= self.unfold_max_growth else h

    def _frozen_tensors(self) -> list[torch.Tensor]:
        """Every tensor the episode-level work reads: the frozen leading blocks (with their FiLM
        and warp, if any) and the relation network; the cache keys on their versions."""
        parts = ("blocks", "films", "warps")
        prefixes = tuple(f"{p}.{i}." for i in range(self.frozen_prefix) for p in parts)
        state = self.network.state_dict(keep_vars=True)
        out = [t for n, t in state.items() if n.startswith(prefixes)]
        if self.relation_net is not None:
            out += list(self.relation_net.state_dict(keep_vars=True).values())
        return out

    @torch.no_grad()
    def relation_scores(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Frozen relation network's scores ``[Q, N]`` (query inputs only; no labels).

        Args:
            support_x, support_y, query_x: the episode's inputs.
            features: the frozen-block features of ``[support_x; query_x]`` when already
                computed; a features-reading relation network scores them (computed here
                otherwise), an image one ignores them.

        Returns:
            The scores.
        """
        assert self.relation_net is not None
        if not self.relation_reads_features:
            return self.relation_net(support_x, support_y, query_x, self.ways)
        if features is None:
            features = self.frozen_features(torch.cat([support_x, query_x]))
        n_s = support_x.shape[0]
        return self.relation_net(features[:n_s], support_y, features[n_s:], self.ways)

    # ----------------------------------------------------------------- inner loop
    def _adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int,
        mode: str,
        query_x: torch.Tensor | None = None,
    ) -> Params:
        """NPBML inner loop (docs/methods/npbml.md, inner rule): the base class's unroll with
        :meth:`inner_inputs` / :meth:`inner_objective` below. Never sees query labels."""
        loss_fn = self.task_loss_fn
        if loss_fn is not None and loss_fn.needs_query and query_x is None:
            raise ValueError(
                "NPBML with the transductive loss term needs the unlabelled query inputs: "
                "call adapt(support_x, support_y, query_x=...)"
            )
        return super()._adapt(support_x, support_y, steps, mode, query_x)

    def inner_inputs(
        self,
        support_x: torch.Tensor,
        mode: str,
        support_y: torch.Tensor | None = None,
        query_x: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | Unfolded, torch.Tensor | None, int, bool]:
        """Once per task: frozen-block features of ``[S_x; Q_x]`` (BN statistics over both; no
        graph), the frozen relation network's query scores, the support size and whether the
        forward is joint."""
        if mode == "none":  # test time: the same episodes come back (validation)
            key = [t for t in (support_x, support_y, query_x) if t is not None]
            return self.episode_cache.get(
                "inner",
                key,
                self._frozen_tensors(),
                lambda: self._episode_inputs(support_x, support_y, query_x),
            )
        return self._episode_inputs(support_x, support_y, query_x)

    def _episode_inputs(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor | None,
        query_x: torch.Tensor | None,
    ) -> tuple[torch.Tensor | Unfolded, torch.Tensor | None, int, bool]:
        loss_fn = self.task_loss_fn
        needs_query = loss_fn is not None and loss_fn.needs_query
        joint = query_x is not None and (self.joint_forward or needs_query)
        x_in = torch.cat([support_x, query_x]) if joint and query_x is not None else support_x
        h = self.frozen_features(x_in)
        scores = None
        if needs_query:
            assert support_y is not None and query_x is not None
            scores = self.relation_scores(support_x, support_y, query_x, h if joint else None)
        return self.unfold_adapted_input(h), scores, support_x.shape[0], joint

    def inner_objective(
        self,
        params: Params,
        inputs: Any,
        support_y: torch.Tensor,
        step: int,
        support_x: torch.Tensor,
        query_x: torch.Tensor | None,
    ) -> torch.Tensor:
        """The task-adaptive loss M (CE alone when no loss network is configured)."""
        h0, scores, n_s, joint = inputs
        logits = self.forward_from(h0, params, self.frozen_prefix)
        if self.task_loss_fn is None:
            return F.cross_entropy(logits[:n_s], support_y)
        return self.task_loss_fn(
            logits[:n_s],
            support_y,
            params=params,
            query_logits=logits[n_s:] if joint else None,
            relation_scores=scores,
        )

    def adapt_task(self, task: Episode, mode: str | None = None) -> Params:
        """Adapted parameters for one task; uses ``support_x, support_y, query_x`` only."""
        mode = mode or ("first" if self.first_order else "second")
        return self._adapt(task.support_x, task.support_y, self.inner_steps, mode, task.query_x)

    # ----------------------------------------------------------------- outer loop
    def task_loss(
        self, task: Episode, mode: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query CE after adaptation; the final prediction runs on ``Q_x`` alone."""
        fast = self.adapt_task(task, mode)
        logits = self.forward_from(self.query_features(task.query_x), fast, self.frozen_prefix)
        return F.cross_entropy(logits, task.query_y), logits

    def batches(self, tasks: list[Episode]) -> bool:
        """Whether the tasks go through the batched inner loop (:mod:`.batched`): the option
        ``batch_tasks``, more than one task, one shape for all, and the NCHW layout."""
        return (
            self.options.batch_tasks
            and len(tasks) > 1
            and not self.channels_last
            and batchable(tasks)
        )

    def batched_task_losses(
        self, tasks: list[Episode], mode: str | None = None, steps: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task query losses ``[B]`` and adapted query logits ``[B, Q, N]`` of equally
        shaped tasks, all tasks' inner loops at once (:func:`.batched.batched_query_logits`);
        the same values as :meth:`task_loss` task by task, up to rounding."""
        mode = mode or ("first" if self.first_order else "second")
        steps = self.inner_steps if steps is None else steps
        logits, acted = batched_query_logits(self, tasks, steps, mode)
        if self.inner_max_grad_norm is not None:
            counts = self._inner_counts.setdefault(threading.get_ident(), [0, 0])
            counts[0] += int(acted.detach().sum())
            counts[1] += len(tasks) * steps
        qy = torch.stack([t.query_y for t in tasks])
        losses = F.cross_entropy(logits.flatten(0, 1), qy.flatten(), reduction="none")
        return losses.view(len(tasks), -1).mean(1), logits

    def _batched_metrics(
        self, losses: torch.Tensor, logits: torch.Tensor, tasks: list[Episode]
    ) -> Metrics:
        accs = [_accuracy(lg, t.query_y) for lg, t in zip(logits, tasks)]
        metrics: Metrics = {
            "loss": float(losses.detach().mean()),
            "accuracy": sum(accs) / len(accs),
        }
        return self._add_clip_metric(metrics, [self.pop_inner_counts()])

    def outer_loss(self, episode: Episode) -> tuple[torch.Tensor, Metrics]:
        """As MAML's, plus ``metrics["finite"]``: False when the meta-loss is NaN/inf (the
        training loop should then skip the step, see :func:`nonfinite_gradients`). Equally
        shaped tasks go through the batched inner loop (:meth:`batches`)."""
        tasks = self._tasks(episode)
        if self.batches(tasks):
            self.pop_inner_counts()
            losses, logits = self.batched_task_losses(tasks)
            loss = losses.sum() / len(tasks)
            metrics = self._batched_metrics(losses, logits, tasks)
        else:
            loss, metrics = super().outer_loss(episode)
        finite = bool(torch.isfinite(loss.detach()))
        metrics["finite"] = finite
        if not finite:
            warnings.warn("NPBML: non-finite meta-loss", RuntimeWarning, stacklevel=2)
        return loss, metrics

    def meta_backward(self, episode: Episode, workers: int | None = None) -> Metrics:
        """As the base class, plus ``metrics["finite"]`` as in :meth:`outer_loss`. Equally
        shaped tasks go through the batched inner loop (:meth:`batches`), with ``workers`` > 1
        as that many batched chunks on as many threads; otherwise per task (optionally
        task-parallel)."""
        tasks = self._tasks(episode)
        workers = self.task_workers if workers is None else int(workers)
        if self.batches(tasks) and workers > 1:
            metrics = self._parallel_batched_backward(tasks, workers)
        elif self.batches(tasks):
            self.pop_inner_counts()
            losses, logits = self.batched_task_losses(tasks)
            (losses.sum() / len(tasks)).backward()
            metrics = self._batched_metrics(losses, logits, tasks)
        else:
            metrics = super().meta_backward(episode, workers)
        metrics["finite"] = math.isfinite(metrics["loss"])
        if not metrics["finite"]:
            warnings.warn("NPBML: non-finite meta-loss", RuntimeWarning, stacklevel=2)
        return metrics

    def _parallel_batched_backward(self, tasks: list[Episode], workers: int) -> Metrics:
        """``workers`` contiguous chunks of the meta-batch, each through the batched inner
        loop on its own thread (:func:`~npbml.algorithms.task_parallel.parallel_task_gradients`),
        gradients added in chunk order."""
        size = -(-len(tasks) // workers)
        chunks = [tasks[i : i + size] for i in range(0, len(tasks), size)]
        params = self.meta_parameters()
        counts: list[tuple[int, int]] = []

        def chunk_fn(replica: nn.Module, chunk: list[Episode]) -> tuple[torch.Tensor, float]:
            learner = cast(NPBML, replica)  # a replicate() of self: the same class
            learner.pop_inner_counts()
            if len(chunk) > 1:
                losses, logits = learner.batched_task_losses(chunk)
            else:
                loss, lg = learner.task_loss(chunk[0])
                losses, logits = loss.unsqueeze(0), lg.unsqueeze(0)
            counts.append(learner.pop_inner_counts())  # list.append is atomic under the GIL
            acc = sum(_accuracy(lg, t.query_y) for lg, t in zip(logits, chunk))
            return losses.sum(), acc

        results = parallel_task_gradients(
            self, chunks, params, chunk_fn, workers, divisor=len(tasks)
        )
        return self._parallel_metrics(params, results, len(tasks), counts)

    def evaluate(self, episode: Episode, inner_steps: int | None = None) -> Metrics:
        """As the base class; equally shaped tasks adapt together (:meth:`batches`)."""
        tasks = self._tasks(episode)
        if not self.batches(tasks):
            return super().evaluate(episode, inner_steps)
        steps = (
            self.eval_inner_steps
            if inner_steps is None
            else self._check_steps(inner_steps, "inner_steps")
        )
        self.pop_inner_counts()
        with torch.no_grad():
            losses, logits = self.batched_task_losses(tasks, "none", steps)
        accs = [_accuracy(lg, t.query_y) for lg, t in zip(logits, tasks)]
        peaks = logits.abs().flatten(1).max(1).values
        peak = float(peaks.max()) if bool(torch.isfinite(peaks).all()) else math.inf
        metrics: Metrics = {
            "loss": float(losses.mean()),
            "accuracy": sum(accs) / len(accs),
            "losses": [float(v) for v in losses],
            "accuracies": accs,
            "max_abs_logit": peak,
            "max_abs_logits": [
                float(v) if bool(torch.isfinite(v)) else math.inf for v in peaks
            ],
        }
        return self._add_clip_metric(metrics, [self.pop_inner_counts()])

    @property
    def evaluation_batch(self) -> int:
        """How many test episodes :func:`npbml.evaluate.evaluate` hands over at once: 16 with
        the batched inner loop, else 1. Per task, 16 at once cost 0.55-0.8x of 4 at once on
        CPU (docs/benchmarks.md); a test pass holds no graph, so memory is no concern."""
        return 16 if self.options.batch_tasks and not self.channels_last else 1

    def nonfinite_meta_gradients(self) -> list[str]:
        """Names of meta-parameters whose gradient is non-finite (call after backward)."""
        return nonfinite_gradients(self)

    def meta_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Meta-parameters by group: ``init``, ``head_row``, ``warp``, ``film``, ``loss``
        (e.g. for per-group learning rates or gradient-norm logging)."""
        groups: dict[str, list[nn.Parameter]] = {
            "init": [],
            "head_row": [],
            "warp": [],
            "film": [],
            "loss": [],
        }
        for n, p in self.named_meta_parameters():
            if n.startswith("inner_loss."):
                groups["loss"].append(p)
            elif n.startswith("model.warps."):
                groups["warp"].append(p)
            elif n.startswith("model.films."):
                groups["film"].append(p)
            elif n.startswith("model.head_row."):
                groups["head_row"].append(p)
            else:
                groups["init"].append(p)
        return groups


def _build_network(
    model: nn.Module, opts: NPBMLOptions
) -> tuple[NPBMLNetwork, tuple[str, ...], tuple[str, ...]]:
    """The :class:`NPBMLNetwork` around ``model`` and its ``(adapt, freeze)`` patterns."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise TypeError(
            "NPBML needs a backbone with non-empty `blocks` (nn.Sequential), got "
            f"{type(model).__name__}"
        )
    adapt_p, freeze_p = adapt_and_freeze(
        blocks, opts.adapt, opts.freeze, opts.use_film, opts.adapt_bn
    )
    film_blocks = opts.film_blocks
    if film_blocks is None:
        film_blocks = [i for i in range(len(blocks)) if not block_frozen(blocks, i, freeze_p)]
    network = NPBMLNetwork(
        model,
        film_blocks=film_blocks if opts.use_film else (),
        warp_after=opts.warp_after if opts.use_warp else (),
        warp_film=opts.use_film,
        film_init_std=opts.film_init_std,
        head_row=opts.head_init == "row",
        warp_bn=opts.warp_bn,
        film_per_conv=opts.film_per_conv,
    )
    # Frozen leading FiLM generators would stay at their init forever: drop them from
    # the FiLM'd blocks by freezing them together with their block.
    freeze_p = freeze_p + tuple(
        f"films.{k}.*" for k in network.films if block_frozen(blocks, int(k), freeze_p)
    )
    return network, adapt_p, freeze_p


def _adapted_names(
    network: NPBMLNetwork, adapt: tuple[str, ...], freeze: tuple[str, ...]
) -> list[str]:
    """Names the inner loop updates: warps and the head row are meta-learned only."""
    adapted, _ = split_params(named_params(network), adapt=adapt, freeze=freeze)
    names = [n for n in adapted if not n.startswith(("warps.", "head_row."))]
    if not names:
        raise ValueError(f"NPBML: no parameter adapts with adapt={adapt}, freeze={freeze}")
    return names


def _build_task_loss(
    network: NPBMLNetwork, opts: NPBMLOptions, adapted: list[str]
) -> TaskAdaptiveLoss | None:
    """The learned loss M of the options (None for plain CE); R reads the adapted tensors."""
    terms = tuple(opts.loss_terms)
    if terms == ("ce",):
        return None
    return TaskAdaptiveLoss(
        num_classes=network.head.out_features,
        use_ce="ce" in terms,
        use_support="support" in terms,
        use_query="query" in terms,
        use_reg="reg" in terms,
        hidden=opts.loss_hidden,
        film=opts.use_film,
        init_std=opts.loss_init_std,
        center_output=opts.center_loss,
        reg_normalize=opts.reg_normalize,
        inputs=opts.loss_inputs,
        reg_tensors=len(adapted) if opts.reg_joint else None,
    )
