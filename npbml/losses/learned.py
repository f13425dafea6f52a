"""Learned loss network of ML3 / AdaLFL (docs/methods/learned-losses.md).

Bechtle et al., "Meta-Learning via Learned Loss" (ICPR 2020, arXiv 1906.05374); Raymond et al.,
"Online Loss Function Learning" (arXiv 2301.13247). The loss network ``M_phi`` is an MLP applied
independently to each class (or output dimension) on the pair (prediction, target), summed over
classes and averaged over the batch. Its parameters ``phi`` are meta-parameters: the network is
usable through :func:`torch.func.functional_call` with a dict of (possibly non-leaf) tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from npbml.activations import smooth_leaky_relu

TASKS = ("classification", "regression")
OUTPUT_ACTIVATIONS = ("softplus", "none")
INITS = ("default", "kaiming")
INPUTS = ("prob", "log_prob")


class LearnedLoss(nn.Module):
    """Per-class MLP loss ``M_phi(y, f(x)) = mean_n sum_c g_phi(p_{n,c}, y_{n,c})``.

    Classification (``task="classification"``): ``p = softmax(logits)`` and ``y`` the one-hot
    target (integer class targets ``[N]`` or a probability target ``[N, C]``). Regression
    (``task="regression"``): the pair is (prediction ``y_hat``, target ``y``) per output dimension.
    ``g_phi`` is ``2 -> hidden -> ... -> 1`` without biases, smooth leaky ReLU hidden activations
    (:func:`npbml.activations.smooth_leaky_relu`) and a ``softplus`` output (ML3; keeps the loss
    non-negative) or none. It runs on the ``[N, C, 2]`` stack of pairs in one batched matmul per
    layer (no loop over classes), so the cost is ``O(N * C * hidden^2)``.

    Args:
        task: ``"classification"`` or ``"regression"``.
        hidden: widths of the hidden layers (default ``(50, 50)``, as in ML3 and AdaLFL).
        output_activation: ``"softplus"`` (default) or ``"none"``.
        init_std: if given, every weight starts ``N(0, init_std^2)`` (overrides ``init``).
        init: ``"default"`` (PyTorch's ``nn.Linear`` init, weight std ``1/sqrt(3 fan_in)``) or
            ``"kaiming"`` (``N(0, 2/fan_in)``, as in the AdaLFL reference code). Kaiming weights
            are 2.4x larger per layer, so the initial loss (and its gradient) is ~15x larger for
            the 2-50-50-1 network. The gradient of a loss on softmax probabilities w.r.t. the
            logits is ``p_k (g'_k - sum_c p_c g'_c)``: with ``C`` classes and ``p ~ 1/C`` at
            initialisation it is ``O(1/C)``, so the init scale matters more with many classes
            (see ``docs/results.md``, loss comparison).
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` (per example).
        inputs: what the per-class MLP reads for classification. ``"prob"`` (default, the
            papers' form: ML3 and AdaLFL, docs/methods/learned-losses.md) is ``p_c = softmax(z)_c``;
            ``"log_prob"`` (**a deviation from the papers**, an option of this toolkit) is
            ``log p_c = log_softmax(z)_c``. With log-probabilities the logit gradient is
            ``g'_k - p_k sum_c g'_c``, which at near-uniform predictions is the slope gap
            ``g'(l, 1) - g'(l, 0)`` -- ``O(1)`` instead of ``O(1/C)`` -- and cross-entropy's
            per-class terms ``g(l, y) = -y l`` are closely approximated by the MLP
            (:func:`npbml.loss_learning.regress_to_cross_entropy`). Ignored for regression.
    """

    def __init__(
        self,
        task: str = "classification",
        hidden: Iterable[int] = (50, 50),
        output_activation: str = "softplus",
        init_std: float | None = None,
        reduction: str = "mean",
        init: str = "default",
        inputs: str = "prob",
    ) -> None:
        super().__init__()
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}"
            )
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        widths = [2, *[int(h) for h in hidden], 1]
        if any(w < 1 for w in widths):
            raise ValueError(f"hidden widths must be positive, got {tuple(hidden)}")
        self.task = task
        self.output_activation = output_activation
        self.reduction = reduction
        self.inputs = inputs
        linears = [nn.Linear(i, o, bias=False) for i, o in zip(widths[:-1], widths[1:])]
        self.layers = nn.ModuleList(linears)
        if init_std is not None:
            for layer in linears:
                nn.init.normal_(layer.weight, 0.0, float(init_std))
        elif init == "kaiming":
            for layer in linears:
                nn.init.kaiming_normal_(layer.weight)

    def pairs(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The ``[N, C, 2]`` stack of (prediction, target) pairs the per-class MLP reads."""
        if self.task == "classification":
            if predictions.dim() != 2:
                raise ValueError(
                    "classification LearnedLoss expects logits [N, C], got "
                    f"{tuple(predictions.shape)}"
                )
            if self.inputs == "log_prob":
                p = torch.log_softmax(predictions, dim=-1)
            else:
                p = torch.softmax(predictions, dim=-1)
            if targets.dim() == 1 and not targets.is_floating_point():
                if targets.shape[0] != predictions.shape[0]:
                    raise ValueError(
                        f"{targets.shape[0]} targets for {predictions.shape[0]} rows of logits"
                    )
                y = F.one_hot(targets, predictions.shape[-1]).to(p.dtype)
            elif targets.shape == predictions.shape:
                y = targets.to(p.dtype)
            else:
                raise ValueError(
                    f"targets must be class indices [N] or a target distribution [N, C]; got "
                    f"{tuple(targets.shape)} for logits {tuple(predictions.shape)}"
                )
            return torch.stack((p, y), dim=-1)
        if predictions.dim() == 0 or targets.numel() != predictions.numel():
            raise ValueError(
                f"regression LearnedLoss expects predictions [N] or [N, D] and targets with the "
                f"same number of elements, got {tuple(predictions.shape)} and "
                f"{tuple(targets.shape)}"
            )
        y_hat = predictions.reshape(predictions.shape[0], -1)
        y = targets.reshape(y_hat.shape).to(y_hat.dtype)
        return torch.stack((y_hat, y), dim=-1)

    def per_class(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``g_phi`` on every (example, class) pair: a ``[N, C]`` tensor."""
        return self.g(self.pairs(predictions, targets))

    def g(self, pairs: torch.Tensor) -> torch.Tensor:
        """The per-class MLP ``g_phi`` on raw pairs ``[..., 2]`` (no softmax); shape ``[...]``."""
        h = pairs
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < last:
                h = smooth_leaky_relu(h)
        if self.output_activation == "softplus":
            h = F.softplus(h)
        return h.squeeze(-1)

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_example = self.per_class(predictions, targets).sum(-1)
        if self.reduction == "mean":
            return per_example.mean()
        if self.reduction == "sum":
            return per_example.sum()
        return per_example

    def extra_repr(self) -> str:
        extra = f"task={self.task!r}, output_activation={self.output_activation!r}"
        if self.task == "classification":
            extra += f", inputs={self.inputs!r}"
        return extra


def all_finite(*tensors: torch.Tensor | None) -> bool:
    """True when every given tensor (``None`` entries ignored) holds only finite values."""
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def snapshot_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's parameters (a "last good state" to roll back to)."""
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def restore_parameters(module: nn.Module, snapshot: Mapping[str, torch.Tensor]) -> None:
    """Copy a :func:`snapshot_parameters` state back into ``module`` in place."""
    params = dict(module.named_parameters())
    missing = set(params) - set(snapshot)
    if missing:
        raise KeyError(f"snapshot lacks parameters {sorted(missing)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(snapshot[k])
