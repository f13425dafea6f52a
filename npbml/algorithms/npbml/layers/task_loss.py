"""NPBML's task-adaptive learned inner loss ``M = CE + L_S + L_Q + R``.

Raymond et al., "Meta-Learning Neural Procedural Biases", arXiv 2406.07983 (docs/methods/npbml.md).
The inner loop of NPBML minimises a meta-learned loss ``M(phi, psi)`` instead of plain CE:

* ``CE``  - the ordinary cross-entropy on the support set (``L_base``), so ``M ~ CE`` at init;
* ``L_S`` - inductive term: per support example an MLP on ``[logits (N), one-hot label (N),
  CE (1)]``, averaged over the support set;
* ``L_Q`` - transductive term: per query example an MLP on ``[logits (N), relation scores r (N),
  CE(logits, argmax r) (1)]``, averaged over the query set. ``r`` comes from a frozen, separately
  pre-trained relation network (:mod:`.relation`); query *labels* are never an input. It has
  its own weights (the reference code reuses the inductive network by mistake; we do not);
* ``R``   - weight regulariser: ONE MLP on the concatenated ``(mean, std, mean |w|, RMS)`` of all
  ``L`` adapted tensors (``4L`` inputs, paper: ``R^{4L} -> R``), so it can weight layers
  differently. Without ``reg_tensors`` (e.g. a loss built before ``L`` is known) R is one 4-input
  MLP per tensor, averaged (the variant this toolkit used before).

Stability (a deviation from the paper, which is silent; docs/methods/npbml.md, "Stability").
Self-FiLM makes every loss-MLP layer quadratic in its input, and the paper feeds it raw logits and
raw L1/L2 norms, which grow as the inner loop runs (the L1 norm of a 3x3x32x32 conv weight is ~470):
a positive feedback that made a trained 20-way NPBML diverge (logits 1e3-1e5). So by default
(``inputs="probs"``, ``reg_normalize=True``) every input of every loss MLP is bounded or
per-element: softmax probabilities in ``[0, 1]`` instead of logits, ``tanh(CE)`` in ``[0, 1)``
instead of CE, relation scores in ``[0, 1]``, and per-element weight statistics that do not grow
with tensor size. The gradient of each learned term w.r.t. the logits is then bounded for any fixed
loss-net weights (softmax and tanh have bounded derivatives). The inner loop adds a hard backstop,
the gradient-norm safeguard of :class:`~npbml.algorithms.base.GradientLearner`
(``inner_max_grad_norm``), which NPBML turns on. ``inputs="logits"``, ``reg_normalize=False``
restore the paper's inputs.

Each MLP is ``in -> 40 -> 40 -> 1`` with ReLU hidden units and a smooth leaky ReLU output
``phi(x) = g x + (1 - g) softplus_b(x)`` (g = 0.25, b = 5); every linear layer is FiLM-modulated
by its own input (``psi``); all weights start ~ N(0, 0.01) (read as the standard deviation),
biases at 0.

"M ~ CE at initialisation". ``phi(0) = (1 - g) log(2) / b ~= 0.104 != 0``, so with all loss
weights exactly zero each term would add that constant. We subtract it (``center_output=True``,
default): every term is ``phi(z) - phi(0)``, so that with zero-initialised loss networks ``M``
equals CE exactly *in value*; its gradient w.r.t. the model equals CE's gradient whether or not
the offset is removed (a constant has no gradient), so the offset changes nothing in training.
With the default N(0, 0.01) init, ``M`` is CE plus a small perturbation (tested).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from npbml.activations import smooth_leaky_relu
from npbml.algorithms.npbml.layers.film import FiLMLinear

#: Names of the switchable terms, in the order ``M = CE + L_S + L_Q + R`` (docs/methods/npbml.md).
TERMS = ("ce", "support", "query", "reg")
#: What the L_S / L_Q networks read: bounded probabilities (default) or the paper's raw logits.
INPUTS = ("probs", "logits")


class LossMLP(nn.Module):
    """``in -> hidden -> hidden -> 1`` MLP of NPBML's loss terms, applied over the last dim.

    ReLU hidden activations, smooth leaky ReLU output (``gamma``, ``beta``), every linear layer a
    :class:`~.film.FiLMLinear` (self-modulated) unless ``film=False``. With
    ``center_output`` the output is ``phi(z) - phi(0)`` (see the module docstring).
    Input ``[..., in_features]``, output ``[...]``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int = 40,
        film: bool = True,
        init_std: float = 0.01,
        gamma: float = 0.25,
        beta: float = 5.0,
        center_output: bool = True,
    ) -> None:
        super().__init__()
        if in_features <= 0 or hidden <= 0:
            raise ValueError(f"LossMLP needs positive sizes, got in={in_features} hidden={hidden}")
        self.in_features = int(in_features)
        self.layers = nn.ModuleList(
            [
                FiLMLinear(in_features, hidden, init_std, film),
                FiLMLinear(hidden, hidden, init_std, film),
                FiLMLinear(hidden, 1, init_std, film),
            ]
        )
        self.gamma, self.beta = float(gamma), float(beta)
        # phi(0) = (1 - g) * log(2) / b: the output of an all-zero network.
        self.offset = (1.0 - self.gamma) * math.log(2.0) / self.beta if center_output else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"LossMLP expects {self.in_features} input features, got shape {tuple(x.shape)}"
            )
        h = torch.relu(self.layers[0](x))
        h = torch.relu(self.layers[1](h))
        z = self.layers[2](h).squeeze(-1)
        return smooth_leaky_relu(z, self.gamma, self.beta) - self.offset


def weight_statistics(
    params: Mapping[str, torch.Tensor] | list[torch.Tensor],
    normalize: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``[T, 4]``: (mean, std, L1 norm, L2 norm) of each tensor, R's input (docs/methods/npbml.md).

    The std is the population std (correction 0; a 1-element tensor is fine) and std and L2 use
    ``sqrt(. + eps)``: the plain formulas have a 0/0 (NaN) gradient at constant or zero tensors,
    which occur at init (zero biases, a head expanded from one row). With ``normalize`` the
    norms are divided by ``numel`` / ``sqrt(numel)`` (mean |w|, RMS), so no statistic grows with
    the tensor's size; the paper's R uses raw norms (``normalize=False``).

    Args:
        params: the adapted tensors (a mapping in a fixed order, or a list).
        normalize: per-element norms (mean |w|, RMS) instead of raw L1 / L2.
        eps: added under the square roots.

    Returns:
        ``[T, 4]`` statistics, one row per tensor in order.
    """
    tensors = list(params.values()) if isinstance(params, Mapping) else list(params)
    if not tensors:
        raise ValueError("the weight regulariser R needs at least one adapted tensor")
    if len(tensors) == 1 or len({(t.dtype, t.device) for t in tensors}) != 1:
        return torch.stack([_tensor_statistics(t, normalize, eps) for t in tensors])
    # All tensors in one pass (issue 13): one flat vector, its squares and absolute values
    # computed once, and per-tensor segment sums of each by split + sum (views and one reduction
    # per segment; under vmap each is one batched reduction), so the op count (forward, inner
    # gradient and the meta-gradient through both) grows only by the reductions with the number
    # of adapted tensors. (A product with a 0/1 segment matrix did the same at 3-17x the time of
    # the reductions, a tall-skinny GEMM; index_add is a slow scatter under vmap.) The variance
    # is E[x^2] - mean^2 (clamped at 0 against rounding, below): no [numel] tensor of deviations
    # (x - mean) in the forward, the gradient or the meta-gradient. Equal to _tensor_statistics
    # up to rounding (tested against it, numpy and finite differences).
    sizes = [t.numel() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    n = torch.tensor(sizes, dtype=flat.dtype, device=flat.device)
    mean = _segment_sums(flat, sizes) / n
    s2 = _segment_sums(flat * flat, sizes)
    var = s2 / n - mean * mean
    # Clamped at 0 against rounding in value only: the derivatives are those of the variance
    # itself. A plain clamp_min cut them off when rounding put a constant tensor's variance
    # (NPBML's head bias, expanded from one value, at every initialisation) just below 0, so the
    # second derivative of its std, and the meta-gradient, depended on summation order.
    var = var + (var.clamp_min(0.0) - var).detach()
    std = (var + eps).sqrt()
    l1 = _segment_sums(flat.abs(), sizes)
    l2 = (s2 + eps).sqrt()
    if normalize:
        l1, l2 = l1 / n, l2 / n.sqrt()
    return torch.stack([mean, std, l1, l2], dim=1)


def _segment_sums(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``[len(sizes)]``: the sums of the consecutive segments of ``x`` with these sizes."""
    return torch.stack([part.sum() for part in x.split(sizes)])


def _tensor_statistics(t: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    """``[4]``: the statistics of one tensor (the straightforward form of the formulas)."""
    flat = t.reshape(-1)
    mean = flat.mean()
    std = ((flat - mean).pow(2).mean() + eps).sqrt()
    l1 = flat.abs().sum()
    l2 = (flat.pow(2).sum() + eps).sqrt()
    if normalize:
        n = flat.numel()
        l1, l2 = l1 / n, l2 / math.sqrt(n)
    return torch.stack([mean, std, l1, l2])


def one_hot(targets: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``F.one_hot(targets, num_classes).to(dtype)`` as a comparison, which
    :func:`torch.func.vmap` can batch (``F.one_hot`` has no batching rule)."""
    classes = torch.arange(num_classes, device=targets.device)
    return (targets.unsqueeze(-1) == classes).to(dtype)


class TaskAdaptiveLoss(nn.Module):
    """NPBML's learned inner loss ``M = CE + L_S + L_Q + R`` with every term switchable.

    Args:
        num_classes: ways ``N`` of the episodes (the MLP input widths depend on it).
        use_ce, use_support, use_query, use_reg: include ``CE``, ``L_S``, ``L_Q``, ``R``
            (paper Table 4: "CE only" is ``use_ce`` alone).
        hidden: hidden width of every loss MLP (40).
        film: FiLM-modulate every loss-MLP layer by its own input.
        init_std: std of the initial weights (0.01; 0 gives ``M == CE`` exactly).
        center_output: subtract ``phi(0)`` from each MLP output (see module docstring).
        reg_normalize: R reads mean-|w| and RMS instead of raw L1/L2 norms (default; the
            paper's raw norms grow with tensor size).
        inputs: ``"probs"`` (default): L_S / L_Q read softmax probabilities and ``tanh(CE)``,
            bounded; ``"logits"``: the paper's raw logits and CE (see the module docstring).
        reg_tensors: number ``L`` of adapted tensors R reads: R is then ONE MLP over their
            ``4L`` statistics (paper). None: one 4-input MLP per tensor, averaged.

    Call ``M(logits, targets, params=..., query_logits=..., relation_scores=...)``:
    ``logits [S, N]`` support logits, ``targets [S]`` support labels, ``params`` the adapted
    tensors (for ``R``), ``query_logits [Q, N]`` and ``relation_scores [Q, N]`` (for ``L_Q``).
    Other keyword arguments of the inner-loss protocol (:mod:`npbml.inner.losses`) are accepted
    and ignored, except that with ``query_logits`` missing it computes them as
    ``learner(query_x, params)`` when both are given. In another learner's inner loop bind the
    relation scores with ``functools.partial(M, relation_scores=r)``.
    """

    def __init__(
        self,
        num_classes: int,
        use_ce: bool = True,
        use_support: bool = True,
        use_query: bool = True,
        use_reg: bool = True,
        hidden: int = 40,
        film: bool = True,
        init_std: float = 0.01,
        center_output: bool = True,
        reg_normalize: bool = True,
        inputs: str = "probs",
        reg_tensors: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"TaskAdaptiveLoss needs num_classes >= 2, got {num_classes}")
        if not (use_ce or use_support or use_query or use_reg):
            raise ValueError("TaskAdaptiveLoss: every term is switched off; enable at least one")
        if inputs not in INPUTS:
            raise ValueError(f"TaskAdaptiveLoss: inputs must be one of {INPUTS}, got {inputs!r}")
        if reg_tensors is not None and reg_tensors < 1:
            raise ValueError(f"reg_tensors must be >= 1 (or None), got {reg_tensors}")
        self.num_classes = int(num_classes)
        self.use_ce = bool(use_ce)
        self.reg_normalize = bool(reg_normalize)
        self.inputs = inputs
        self.reg_tensors = int(reg_tensors) if reg_tensors is not None else None

        def mlp(in_features: int) -> LossMLP:
            return LossMLP(
                in_features,
                hidden=hidden,
                film=film,
                init_std=init_std,
                center_output=center_output,
            )

        n = self.num_classes
        self.support_net = mlp(2 * n + 1) if use_support else None
        self.query_net = mlp(2 * n + 1) if use_query else None
        reg_in = 4 * self.reg_tensors if self.reg_tensors is not None else 4
        self.reg_net = mlp(reg_in) if use_reg else None

    @property
    def terms(self) -> tuple[str, ...]:
        """The enabled terms, among ``("ce", "support", "query", "reg")``."""
        on = (self.use_ce, self.support_net, self.query_net, self.reg_net)
        return tuple(t for t, flag in zip(TERMS, on) if flag is not None and flag is not False)

    @property
    def needs_query(self) -> bool:
        """True when ``L_Q`` is on (the inner loop then needs query inputs and relation scores)."""
        return self.query_net is not None

    def _check_logits(self, logits: torch.Tensor, what: str) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"TaskAdaptiveLoss({self.num_classes}-way) expects {what} of shape "
                f"[batch, {self.num_classes}], got {tuple(logits.shape)}"
            )

    def _features(self, logits: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """``[scores (N), CE (1)]`` of one example each: softmax and ``tanh(CE)`` (bounded,
        ``inputs="probs"``) or the paper's raw logits and CE."""
        ce = F.cross_entropy(logits, targets, reduction="none").unsqueeze(-1)
        if self.inputs == "logits":
            return [logits, ce]
        return [logits.softmax(-1), torch.tanh(ce)]

    def support_term(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``L_S``: mean over support examples of MLP([p or logits, one-hot y, CE])."""
        assert self.support_net is not None
        onehot = one_hot(targets, self.num_classes, logits.dtype)
        scores, ce = self._features(logits, targets)
        return self.support_net(torch.cat([scores, onehot, ce], dim=-1)).mean()

    def query_term(self, query_logits: torch.Tensor, relation_scores: torch.Tensor) -> torch.Tensor:
        """``L_Q``: mean over query examples of MLP([p or logits, r, CE(logits, argmax r)])."""
        assert self.query_net is not None
        if relation_scores.shape != query_logits.shape:
            raise ValueError(
                f"relation_scores {tuple(relation_scores.shape)} must match the query logits "
                f"{tuple(query_logits.shape)} ([queries, ways])"
            )
        r = relation_scores.detach().to(query_logits.dtype)  # the relation network is frozen
        scores, ce = self._features(query_logits, r.argmax(-1))
        return self.query_net(torch.cat([scores, r, ce], dim=-1)).mean()

    def reg_term(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``R``: one MLP over the statistics of all adapted tensors (with ``reg_tensors``), or
        the mean over tensors of a 4-input MLP."""
        assert self.reg_net is not None
        stats = weight_statistics(params, self.reg_normalize)
        if self.reg_tensors is None:
            return self.reg_net(stats).mean()
        if stats.shape[0] != self.reg_tensors:
            raise ValueError(
                f"the joint regulariser R was built for {self.reg_tensors} adapted tensors, got "
                f"{stats.shape[0]}; build TaskAdaptiveLoss with reg_tensors={stats.shape[0]}"
            )
        return self.reg_net(stats.reshape(-1))

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        *,
        params: Mapping[str, torch.Tensor] | None = None,
        query_logits: torch.Tensor | None = None,
        relation_scores: torch.Tensor | None = None,
        query_x: torch.Tensor | None = None,
        learner=None,
        **unused,
    ) -> torch.Tensor:
        """``M`` on one episode (see the class docstring for the arguments)."""
        self._check_logits(logits, "support logits")
        loss = logits.new_zeros(())
        if self.use_ce:
            loss = loss + F.cross_entropy(logits, targets)
        if self.support_net is not None:
            loss = loss + self.support_term(logits, targets)
        if self.query_net is not None:
            if query_logits is None and query_x is not None and learner is not None:
                query_logits = learner(query_x, params)
            if query_logits is None or relation_scores is None:
                raise ValueError(
                    "the transductive term L_Q needs query_logits (or query_x and learner) and "
                    "relation_scores from a frozen RelationNetwork; pass them or build the loss "
                    "with use_query=False"
                )
            self._check_logits(query_logits, "query logits")
            loss = loss + self.query_term(query_logits, relation_scores)
        if self.reg_net is not None:
            if not params:
                raise ValueError(
                    "the weight regulariser R needs params= (the adapted tensors); pass them or "
                    "build the loss with use_reg=False"
                )
            loss = loss + self.reg_term(params)
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, terms={self.terms}, inputs={self.inputs}, "
            f"reg_tensors={self.reg_tensors}"
        )
