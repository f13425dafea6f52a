"""NPBML's options: the single source of its defaults, and the paper's ablation presets.

Raymond et al., "Meta-Learning Neural Procedural Biases", arXiv 2406.07983 (docs/methods/npbml.md).
:class:`NPBMLOptions` is what a config's ``algorithm.options`` holds for ``algorithm.name: npbml``
and what :class:`~npbml.algorithms.npbml.NPBML` reads; nothing else repeats these defaults.
docs/npbml.md lists every default that differs from the paper or the reference code, and why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ABLATIONS", "ALL_TERMS", "NPBMLOptions"]

ALL_TERMS = ("ce", "support", "query", "reg")

#: Paper Table 3 (components) and Table 4 (loss terms), each one keyword preset away.
ABLATIONS: dict[str, dict[str, Any]] = {
    # Table 3
    "init": dict(use_film=False, use_warp=False, loss_terms=("ce",)),
    "+optimizer": dict(use_film=False, use_warp=True, loss_terms=("ce",)),
    "+loss": dict(use_film=False, use_warp=False, loss_terms=ALL_TERMS),
    "+optimizer+loss": dict(use_film=False, use_warp=True, loss_terms=ALL_TERMS),
    "full": dict(use_film=True, use_warp=True, loss_terms=ALL_TERMS),
    # Table 4 (learned loss without the optimizer or FiLM, as in the paper's loss ablation)
    "loss:ce": dict(use_film=False, use_warp=False, loss_terms=("ce",)),
    "loss:+support": dict(use_film=False, use_warp=False, loss_terms=("ce", "support")),
    "loss:+query": dict(use_film=False, use_warp=False, loss_terms=("ce", "query")),
    "loss:+reg": dict(use_film=False, use_warp=False, loss_terms=("ce", "reg")),
    "loss:all": dict(use_film=False, use_warp=False, loss_terms=ALL_TERMS),
}


@dataclass
class NPBMLOptions:
    """Everything NPBML-specific (the MAML-family arguments ``inner_lr``, ``inner_steps``,
    ``first_order``, ``eval_inner_steps`` are the learner's own).

    Attributes:
        adapt: fnmatch patterns of the adapted tensors; None: the reference choice (the last
            block's conv/linear weights, its FiLM generator and the head; conv biases never,
            BatchNorm affine only with ``adapt_bn``). With explicit patterns ``freeze`` is
            empty unless given.
        freeze: patterns of tensors neither adapted nor meta-learned; None with ``adapt=None``:
            every block before the last (the reference code's frozen, pre-trained body).
        adapt_bn: with ``adapt=None``, the last block's BatchNorm affine parameters adapt too.
        momentum, nesterov, weight_decay, dampening: the inner SGD (reference code: Nesterov
            momentum 0.9, weight decay 5e-4); ``momentum=0, nesterov=False, weight_decay=0`` is
            the paper's plain SGD.
        inner_max_grad_norm: the inner-step safeguard (a deviation, the paper is silent): each
            inner step's gradient is rescaled to at most this global L2 norm, counted as
            ``metrics["inner_clipped"]`` when it acts; None switches it off.
        use_film: FiLM in the encoder (``film_blocks``, default every block not frozen), the
            warps and the loss MLPs.
        film_blocks: block indices with FiLM (None: every block not frozen).
        film_per_conv: one FiLM after each conv's BatchNorm in residual blocks (reference
            AdaResNet); False: one per block, after its last BN (TADAM's placement).
        use_warp: warp layers (the meta-learned preconditioner omega) after ``warp_after``.
        warp_after: block indices followed by a warp (default the last, as the reference).
        warp_bn: the warp is conv -> BatchNorm -> FiLM (reference code); False: conv -> FiLM,
            exactly the identity at initialisation.
        loss_terms: subset of ``("ce", "support", "query", "reg")``; ``("ce",)`` is plain CE.
        loss_hidden: hidden width of the loss MLPs (40).
        loss_init_std, film_init_std: std of the loss-MLP / FiLM-generator initial weights.
        loss_inputs: ``"probs"`` (bounded: softmax and tanh(CE), the default) or ``"logits"``
            (the paper's raw logits and CE); see :mod:`npbml.algorithms.npbml.layers.task_loss`.
        reg_normalize: R reads per-element statistics (mean |w|, RMS; default) instead of raw
            L1/L2 norms, which grow with tensor size.
        reg_joint: R is one MLP over the statistics of all adapted tensors (the paper's
            ``R^{4L} -> R``); False: one 4-input MLP per tensor, averaged.
        center_loss: subtract ``phi(0)`` from each loss-MLP output (M == CE at zero weights).
        head_init: ``"row"`` (one meta-learned row shared by all classes), ``"model"`` (the
            head's own weights, MAML's init) or ``"proto"`` (per task, the nearest-prototype
            classifier of the support features: Proto-MAML, Triantafillou et al. 2020).
        joint_forward: the inner forward runs on ``[S_x; Q_x]`` together.
        batch_tasks: the inner loops of a meta-batch's equally shaped tasks run as one
            vectorised loop (:mod:`npbml.algorithms.npbml.batched`; the same math, fewer
            operations); False: task by task.
        episode_cache: how many episodes' no-grad work (frozen features, relation scores) test
            time keeps for episodes seen again, e.g. the fixed validation episodes
            (:class:`~npbml.algorithms.npbml.cache.EpisodeCache`, keyed on content); 0: none.
        ablation: a key of :data:`ABLATIONS`; overrides ``use_film``, ``use_warp``,
            ``loss_terms``.
        backbone_checkpoint: a ``npbml pretrain`` file whose body weights are loaded into the
            model by :func:`~npbml.algorithms.npbml.build_npbml` (the learner reads no files).
        relation_checkpoint: a ``npbml pretrain-relation`` file, loaded the same way.
    """

    adapt: str | list[str] | None = None
    freeze: str | list[str] | None = None
    adapt_bn: bool = False
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    dampening: float = 0.0
    inner_max_grad_norm: float | None = 10.0
    use_film: bool = True
    film_blocks: list[int] | None = None
    film_per_conv: bool = True
    use_warp: bool = True
    warp_after: list[int] = field(default_factory=lambda: [-1])
    warp_bn: bool = True
    loss_terms: list[str] = field(default_factory=lambda: list(ALL_TERMS))
    loss_hidden: int = 40
    loss_init_std: float = 0.01
    film_init_std: float = 0.01
    loss_inputs: Literal["probs", "logits"] = "probs"
    reg_normalize: bool = True
    reg_joint: bool = True
    center_loss: bool = True
    head_init: Literal["row", "model", "proto"] = "row"
    joint_forward: bool = True
    batch_tasks: bool = True
    episode_cache: int = 128
    ablation: str | None = None
    backbone_checkpoint: str | None = None
    relation_checkpoint: str | None = None

    def resolved(self) -> NPBMLOptions:
        """A copy with the ablation preset applied (``ablation`` kept for the record).

        Raises:
            ValueError: for an unknown ablation or loss term.
        """
        out = dataclasses.replace(self)
        if self.ablation is not None:
            if self.ablation not in ABLATIONS:
                raise ValueError(
                    f"unknown ablation {self.ablation!r}; available: {sorted(ABLATIONS)}"
                )
            preset = ABLATIONS[self.ablation]
            out.use_film, out.use_warp = preset["use_film"], preset["use_warp"]
            out.loss_terms = list(preset["loss_terms"])
        terms = tuple(out.loss_terms)
        if not terms or any(t not in ALL_TERMS for t in terms):
            raise ValueError(f"loss_terms must be a non-empty subset of {ALL_TERMS}, got {terms!r}")
        if out.head_init not in ("row", "model", "proto"):
            raise ValueError(
                f"head_init must be 'row', 'model' or 'proto', got {out.head_init!r}"
            )
        if out.loss_inputs not in ("probs", "logits"):
            raise ValueError(f"loss_inputs must be 'probs' or 'logits', got {out.loss_inputs!r}")
        return out

    @classmethod
    def from_kwargs(cls, base: NPBMLOptions | None = None, **kwargs: Any) -> NPBMLOptions:
        """``base`` (default: all defaults) with ``kwargs`` replaced.

        Raises:
            TypeError: naming the unknown keys and listing the valid ones.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown NPBML option(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(base or cls(), **kwargs)
