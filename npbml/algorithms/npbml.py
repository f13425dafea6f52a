"""NPBML: meta-learned initialisation, preconditioned optimizer and task-adaptive loss.

Raymond et al., "Meta-Learning Neural Procedural Biases", arXiv 2406.07983 (METHODS.md sec. 3).
Meta-parameters ``Phi = {theta (init), omega (warps), phi (loss), psi (FiLM)}``.

    inner:  theta_{j+1} = theta_j - alpha * P(omega, psi) grad_theta M(phi, psi)(S, Q_x; theta_j)
    outer:  Phi <- Phi - eta (1/B) sum_i grad_Phi L_CE(Q_i; theta_{i,J}(Phi))   (second order)

Pieces (each an ``nn.Module`` of its own, usable elsewhere):

* theta: the backbone (``model.blocks``, ``model.head``) wrapped by reference in
  :class:`NPBMLNetwork` (no copies), plus the permutation-invariant head init :class:`HeadRow`:
  all ``N`` head rows start from one meta-learned row. The rows are *expanded* from it, so the
  meta-gradient reaches it (sum of the per-row gradients); the reference code writes through
  ``.data`` and loses it.
* omega: :class:`~npbml.warp.WarpLayer` after the blocks in ``warp_after`` (default the last);
  never updated by the inner loop, so ``P`` is the induced preconditioner ``Omega Omega^T``.
* phi: :class:`~npbml.task_loss.TaskAdaptiveLoss` ``M = CE + L_S + L_Q + R``.
* psi: FiLM generators on the non-frozen encoder blocks, in the warps and in the loss MLPs.

Inner loop: forward on ``[S_x; Q_x]`` together (BatchNorm statistics over both; ``joint_forward``),
final query prediction on ``Q_x`` alone; SGD with Nesterov momentum 0.9 and weight decay 5e-4,
lr 0.01, J = 5 by default (reference code), plain SGD with ``momentum=0, weight_decay=0``
(the paper's equation). Frozen leading blocks (neither adapted nor meta-learned) are run once per
episode without a graph. Query labels are never seen by the inner loop: ``_adapt`` receives only
``support_x, support_y, query_x``.

Ablations (paper Tables 3 and 4) are keyword presets in :data:`ABLATIONS`, e.g.
``NPBML(model, **ABLATIONS["+optimizer+loss"])``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from npbml.algorithms.base import GradientLearner, Metrics
from npbml.film import FiLMGenerator, block_channels, film_block_forward
from npbml.params import Params, match_names
from npbml.task_loss import TERMS, TaskAdaptiveLoss
from npbml.warp import WarpLayer
from tasks.episode import Episode

__all__ = [
    "ABLATIONS",
    "NPBML",
    "HeadRow",
    "NPBMLNetwork",
    "NPBMLOptions",
    "nonfinite_gradients",
]

_ALL_TERMS = ("ce", "support", "query", "reg")

#: Paper Table 3 (components) and Table 4 (loss terms), each one keyword preset away.
ABLATIONS: dict[str, dict[str, Any]] = {
    # Table 3
    "init": dict(use_film=False, use_warp=False, loss_terms=("ce",)),
    "+optimizer": dict(use_film=False, use_warp=True, loss_terms=("ce",)),
    "+loss": dict(use_film=False, use_warp=False, loss_terms=_ALL_TERMS),
    "+optimizer+loss": dict(use_film=False, use_warp=True, loss_terms=_ALL_TERMS),
    "full": dict(use_film=True, use_warp=True, loss_terms=_ALL_TERMS),
    # Table 4 (learned loss without the optimizer or FiLM, as in the paper's loss ablation)
    "loss:ce": dict(use_film=False, use_warp=False, loss_terms=("ce",)),
    "loss:+support": dict(use_film=False, use_warp=False, loss_terms=("ce", "support")),
    "loss:+query": dict(use_film=False, use_warp=False, loss_terms=("ce", "query")),
    "loss:+reg": dict(use_film=False, use_warp=False, loss_terms=("ce", "reg")),
    "loss:all": dict(use_film=False, use_warp=False, loss_terms=_ALL_TERMS),
}


class HeadRow(nn.Module):
    """Permutation-invariant head initialisation: one row ``w [F]`` and bias ``b []`` shared by
    all ``N`` classes (METHODS.md sec. 3). :meth:`expand` returns ``(W [N, F], bias [N])`` as
    views of the parameters, so the meta-gradient of each row flows into ``w``, ``b``.

    Starts at zero (all logits equal, so the initial prediction is uniform whatever the row);
    :meth:`from_linear` starts it at the mean row of a (pre-trained) linear layer instead.
    """

    def __init__(self, features: int, ways: int) -> None:
        super().__init__()
        if features < 1 or ways < 2:
            raise ValueError(f"HeadRow needs features >= 1 and ways >= 2, got {features}, {ways}")
        self.ways = int(ways)
        self.weight = nn.Parameter(torch.zeros(int(features)))
        self.bias = nn.Parameter(torch.zeros(()))

    def expand(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W [N, F], bias [N])``: every row the shared row (differentiable views)."""
        return (
            self.weight.unsqueeze(0).expand(self.ways, -1),
            self.bias.expand(self.ways),
        )

    @torch.no_grad()
    def from_linear(self, linear: nn.Linear) -> HeadRow:
        """Set the row to the mean row (and mean bias) of ``linear``; returns self."""
        self.weight.copy_(linear.weight.mean(0))
        if linear.bias is not None:
            self.bias.copy_(linear.bias.mean())
        return self

    def extra_repr(self) -> str:
        return f"features={self.weight.numel()}, ways={self.ways}"


class NPBMLNetwork(nn.Module):
    """The backbone with FiLM-modulated blocks, warp layers and (optionally) a head row.

    Holds ``model.blocks`` and ``model.head`` by reference, so parameter names are the model's
    (``blocks.3.conv.weight``, ``head.weight``) next to ``films.<i>.*``, ``warps.<i>.*`` and
    ``head_row.*``. The model needs ``blocks`` (an ``nn.Sequential`` of blocks) and a linear
    ``head``; block outputs are flattened, or averaged over space when the flat size does not
    match the head (as Conv4 "strided" / ResNet12 "avg" do).

    With a head row, the head's own weights are placeholders: :class:`NPBML` always passes the
    head tensors (expanded from the row, or adapted) in the parameter dict.
    """

    def __init__(
        self,
        model: nn.Module,
        film_blocks: Sequence[int] = (),
        warp_after: Sequence[int] = (),
        warp_film: bool = True,
        film_init_std: float = 0.01,
        head_row: bool = False,
    ) -> None:
        super().__init__()
        blocks = getattr(model, "blocks", None)
        head = getattr(model, "head", None)
        if not isinstance(blocks, nn.Sequential) or not isinstance(head, nn.Linear):
            raise TypeError(
                "NPBML needs a backbone with `blocks` (nn.Sequential) and a linear `head`, like "
                f"npbml.models.Conv4/ResNet12; got {type(model).__name__}"
            )
        self.blocks = blocks
        self.head = head
        n = len(blocks)
        film_idx = sorted({self._index(i, n, "film_blocks") for i in film_blocks})
        warp_idx = sorted({self._index(i, n, "warp_after") for i in warp_after})
        self.films = nn.ModuleDict(
            {
                str(i): FiLMGenerator(*block_channels(blocks[i]), init_std=film_init_std)
                for i in film_idx
            }
        )
        self.warps = nn.ModuleDict(
            {
                str(i): WarpLayer(block_channels(blocks[i])[1], warp_film, film_init_std)
                for i in warp_idx
            }
        )
        self.head_row = HeadRow(head.in_features, head.out_features) if head_row else None

    @staticmethod
    def _index(i: int, n: int, what: str) -> int:
        if not -n <= int(i) < n:
            raise ValueError(f"{what}: block index {i} out of range for {n} blocks")
        return int(i) % n

    def block_forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Block ``i`` with its FiLM generator and the warp after it, if any."""
        key = str(i)
        if key in self.films:
            h = film_block_forward(self.blocks[i], self.films[key], h)
        else:
            h = self.blocks[i](h)
        if key in self.warps:
            h = self.warps[key](h)
        return h

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Activations after blocks ``start .. stop-1`` given the input of block ``start``."""
        stop = len(self.blocks) if stop is None else stop
        for i in range(start, stop):
            x = self.block_forward(i, x)
        return x

    def reduce(self, h: torch.Tensor) -> torch.Tensor:
        """Final block output -> head features (flatten, or spatial mean, to match the head)."""
        flat = h.flatten(1)
        if flat.shape[1] == self.head.in_features:
            return flat
        if h.dim() == 4 and h.shape[1] == self.head.in_features:
            return h.mean(dim=(2, 3))
        raise ValueError(
            f"block output {tuple(h.shape)} fits neither flattened nor pooled the head's "
            f"{self.head.in_features} input features; check the image size of the model"
        )

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits; ``start > 0`` means ``x`` is the (precomputed) input of block ``start``."""
        return self.head(self.reduce(self.run_blocks(x, start)))


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
        inner_lr, inner_steps, eval_inner_steps, first_order: as MAML (reference: 0.01, 5).
        momentum, nesterov, weight_decay, dampening: inner SGD (reference: 0.9, True, 5e-4);
            ``momentum=0, nesterov=False, weight_decay=0`` is the paper's plain SGD.
        adapt, freeze: fnmatch patterns over :class:`NPBMLNetwork` names. ``adapt=None`` gives
            the reference choice: the last block, its FiLM generator and the head adapt; the
            earlier blocks are frozen (not adapted, not meta-learned). With an explicit ``adapt``
            the default ``freeze`` is empty. Warps and the head row never adapt.
        use_film: FiLM in the encoder (``film_blocks``, default: every block not frozen), in the
            warps and in the loss MLPs.
        use_warp, warp_after: warp layers after these block indices (default: the last).
        loss_terms: subset of ``("ce", "support", "query", "reg")``; ``("ce",)`` is plain CE.
        loss_hidden, loss_init_std, film_init_std, reg_normalize, center_loss: see
            :class:`~npbml.task_loss.TaskAdaptiveLoss` and :mod:`npbml.film`.
        head_init: ``"row"`` (meta-learned shared row) or ``"model"`` (the head's own weights,
            MAML's init).
        joint_forward: inner forward on ``[S_x; Q_x]`` when query inputs are given.
        relation_net: frozen relation network (``(sx, sy, qx, ways) -> [Q, N]``), required by
            the ``"query"`` term; its parameters get ``requires_grad=False``.
        ablation: a key of :data:`ABLATIONS`; sets ``use_film``, ``use_warp`` and ``loss_terms``
            (overriding those arguments).
        backbone_checkpoint: a :func:`npbml.pretrain.save_backbone` file whose body weights
            (``blocks.*``) are loaded into ``model`` first (supervised pre-training).
        relation_checkpoint: a :func:`npbml.relation.save_relation` file, used when
            ``relation_net`` is not given.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        first_order: bool = False,
        eval_inner_steps: int | None = None,
        adapt: str | Sequence[str] | None = None,
        freeze: str | Sequence[str] | None = None,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        dampening: float = 0.0,
        use_film: bool = True,
        film_blocks: Sequence[int] | None = None,
        use_warp: bool = True,
        warp_after: Sequence[int] = (-1,),
        loss_terms: Sequence[str] = _ALL_TERMS,
        loss_hidden: int = 40,
        loss_init_std: float = 0.01,
        film_init_std: float = 0.01,
        reg_normalize: bool = False,
        center_loss: bool = True,
        head_init: str = "row",
        joint_forward: bool = True,
        relation_net: nn.Module | None = None,
        ablation: str | None = None,
        backbone_checkpoint: str | None = None,
        relation_checkpoint: str | None = None,
    ) -> None:
        if ablation is not None:
            if ablation not in ABLATIONS:
                raise ValueError(f"unknown ablation {ablation!r}; available: {sorted(ABLATIONS)}")
            preset = ABLATIONS[ablation]
            use_film, use_warp = preset["use_film"], preset["use_warp"]
            loss_terms = preset["loss_terms"]
        if backbone_checkpoint is not None:
            from npbml.pretrain import load_backbone_weights

            load_backbone_weights(model, backbone_checkpoint)
        terms = tuple(loss_terms)
        if "query" in terms and relation_net is None and relation_checkpoint is not None:
            from npbml.relation import load_relation

            relation_net = load_relation(relation_checkpoint)
        bad = [t for t in terms if t not in TERMS]
        if bad or not terms:
            raise ValueError(f"loss_terms must be a non-empty subset of {TERMS}, got {terms!r}")
        if head_init not in ("row", "model"):
            raise ValueError(f"head_init must be 'row' or 'model', got {head_init!r}")
        if "query" in terms and relation_net is None:
            raise ValueError(
                "the transductive loss term 'query' needs relation_net= (a pre-trained, frozen "
                "npbml.relation.RelationNetwork) or relation_checkpoint= (written by `npbml "
                "pretrain-relation`); pass one or drop 'query' from loss_terms"
            )
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
            raise TypeError(
                "NPBML needs a backbone with non-empty `blocks` (nn.Sequential), got "
                f"{type(model).__name__}"
            )
        n_blocks = len(blocks)
        last = n_blocks - 1
        if adapt is None:
            adapt_p: tuple[str, ...] = (f"blocks.{last}.*", "head.*")
            if use_film:
                adapt_p += (f"films.{last}.*",)
            freeze_p: tuple[str, ...] = (
                tuple(f"blocks.{i}.*" for i in range(last)) if freeze is None else _pats(freeze)
            )
        else:
            adapt_p = _pats(adapt)
            freeze_p = () if freeze is None else _pats(freeze)
        if film_blocks is None:
            film_blocks = [i for i in range(n_blocks) if not _block_frozen(blocks, i, freeze_p)]
        network = NPBMLNetwork(
            model,
            film_blocks=film_blocks if use_film else (),
            warp_after=warp_after if use_warp else (),
            warp_film=use_film,
            film_init_std=film_init_std,
            head_row=head_init == "row",
        )
        # Frozen leading FiLM generators would stay at their init forever: drop them from
        # the FiLM'd blocks by freezing them together with their block.
        freeze_p = freeze_p + tuple(
            f"films.{k}.*" for k in network.films if _block_frozen(blocks, int(k), freeze_p)
        )
        inner_loss = None
        if terms != ("ce",):
            inner_loss = TaskAdaptiveLoss(
                num_classes=network.head.out_features,
                use_ce="ce" in terms,
                use_support="support" in terms,
                use_query="query" in terms,
                use_reg="reg" in terms,
                hidden=loss_hidden,
                film=use_film,
                init_std=loss_init_std,
                center_output=center_loss,
                reg_normalize=reg_normalize,
            )
        super().__init__(
            network,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            first_order=first_order,
            eval_inner_steps=eval_inner_steps,
            adapt=adapt_p,
            freeze=freeze_p,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            inner_loss=inner_loss,
        )
        # Warps and the head row are meta-learned only: the inner loop never updates them.
        self.adapted_names = [
            n for n in self.adapted_names if not n.startswith(("warps.", "head_row."))
        ]
        if not self.adapted_names:
            raise ValueError(f"NPBML: no parameter adapts with adapt={adapt_p}, freeze={freeze_p}")
        self.relation_net = relation_net if "query" in terms else None
        if self.relation_net is not None:
            for p in self.relation_net.parameters():
                p.requires_grad_(False)
        self.loss_terms = terms
        self.joint_forward = bool(joint_forward)
        self.ways = network.head.out_features
        self.frozen_prefix = self._count_frozen_prefix()

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

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """As the base class, less the head's own tensors when the head row replaces them
        (they are placeholders, see :class:`NPBMLNetwork`; the user's model is not modified)."""
        skip = ("model.head.",) if self.network.head_row is not None else ()
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
        own = dict(self.network.named_parameters())
        own.update(self.head_params())
        return {n: own[n] for n in self.adapted_names}

    def _with_head(self, params: Params | None) -> Params:
        if self.network.head_row is None:
            return dict(params or {})
        return {**self.head_params(), **(params or {})}

    def forward(self, x: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """Logits of ``x`` (raw inputs) at ``params`` (missing entries: the initialisation)."""
        return self.run_module(self.network, self._with_head(params), x)

    def forward_from(self, h: torch.Tensor, params: Params | None, start: int) -> torch.Tensor:
        """Logits from the input ``h`` of block ``start`` (e.g. precomputed frozen features)."""
        return self.run_module(self.network, self._with_head(params), h, start=start)

    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the frozen leading blocks (no graph); ``x`` itself if there are none."""
        if not self.frozen_prefix:
            return x
        return self.run_module(self.network, None, x, 0, self.frozen_prefix, method="run_blocks")

    @torch.no_grad()
    def relation_scores(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """Frozen relation network's scores ``[Q, N]`` (query inputs only; no labels)."""
        assert self.relation_net is not None
        return self.relation_net(support_x, support_y, query_x, self.ways)

    # ----------------------------------------------------------------- inner loop
    def _adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int,
        mode: str,
        query_x: torch.Tensor | None = None,
    ) -> Params:
        """NPBML inner loop (METHODS.md sec. 3, inner rule): the base class's unroll with
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
    ) -> tuple[torch.Tensor, torch.Tensor | None, int, bool]:
        """Once per task: frozen-block features of ``[S_x; Q_x]`` (BN statistics over both; no
        graph), the frozen relation network's query scores, the support size and whether the
        forward is joint."""
        loss_fn = self.task_loss_fn
        needs_query = loss_fn is not None and loss_fn.needs_query
        joint = query_x is not None and (self.joint_forward or needs_query)
        x_in = torch.cat([support_x, query_x]) if joint else support_x
        scores = None
        if needs_query:
            assert support_y is not None and query_x is not None
            scores = self.relation_scores(support_x, support_y, query_x)
        return self.frozen_features(x_in), scores, support_x.shape[0], joint

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
        logits = self.forward_from(self.frozen_features(task.query_x), fast, self.frozen_prefix)
        return F.cross_entropy(logits, task.query_y), logits

    def outer_loss(self, episode: Episode) -> tuple[torch.Tensor, Metrics]:
        """As MAML's, plus ``metrics["finite"]``: False when the meta-loss is NaN/inf (the
        training loop should then skip the step, see :func:`nonfinite_gradients`)."""
        loss, metrics = super().outer_loss(episode)
        finite = bool(torch.isfinite(loss.detach()))
        metrics["finite"] = finite
        if not finite:
            warnings.warn("NPBML: non-finite meta-loss", RuntimeWarning, stacklevel=2)
        return loss, metrics

    def meta_backward(self, episode: Episode, workers: int | None = None) -> Metrics:
        """As the base class (per-task backward, optionally task-parallel), plus
        ``metrics["finite"]`` as in :meth:`outer_loss`."""
        metrics = super().meta_backward(episode, workers)
        metrics["finite"] = math.isfinite(metrics["loss"])
        if not metrics["finite"]:
            warnings.warn("NPBML: non-finite meta-loss", RuntimeWarning, stacklevel=2)
        return metrics

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


def _pats(p: str | Sequence[str]) -> tuple[str, ...]:
    return (p,) if isinstance(p, str) else tuple(p)


def _block_frozen(blocks: nn.Sequential, i: int, freeze: Sequence[str]) -> bool:
    names = [f"blocks.{i}.{n}" for n, _ in blocks[i].named_parameters()]
    return bool(names) and len(match_names(names, freeze)) == len(names)


@dataclass
class NPBMLOptions:
    """``algorithm.options`` of a config with ``algorithm.name: npbml`` (see :class:`NPBML`)."""

    adapt: str | list[str] | None = None
    freeze: str | list[str] | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    dampening: float = 0.0
    use_film: bool = True
    film_blocks: list[int] | None = None
    use_warp: bool = True
    warp_after: list[int] = field(default_factory=lambda: [-1])
    loss_terms: list[str] = field(default_factory=lambda: list(_ALL_TERMS))
    loss_hidden: int = 40
    loss_init_std: float = 0.01
    film_init_std: float = 0.01
    reg_normalize: bool = False
    center_loss: bool = True
    head_init: Literal["row", "model"] = "row"
    joint_forward: bool = True
    ablation: str | None = None
    backbone_checkpoint: str | None = None
    relation_checkpoint: str | None = None


def _register() -> None:
    # build_algorithm("npbml", ...) and validated config options once this module is imported;
    # npbml/algorithms/__init__.py (another owner's file) should import it so that the name is
    # always available.
    from npbml.algorithms import ALGORITHMS
    from npbml.config import register_options

    ALGORITHMS.setdefault("npbml", NPBML)
    register_options("algorithm", "npbml", NPBMLOptions)


_register()
