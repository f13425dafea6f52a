"""A differentiable look-ahead of the step a user's own ``torch.optim`` optimizer will take.

Online loss learning (AdaLFL, Raymond et al., arXiv 2301.13247, eq. 6-7) scores the learned loss
by the task loss *after* the base optimizer's step on it, so the meta-gradient must pass through
that step. :class:`TorchOptimStep` computes the step of a live :class:`torch.optim.SGD`
(momentum, dampening, Nesterov, weight decay), :class:`torch.optim.Adam` or
:class:`torch.optim.AdamW` (AMSGrad too) from the optimizer's own hyper-parameters and state, as
new tensors that stay differentiable w.r.t. the gradient. It never writes to the optimizer: the
caller applies the real step with ``optimizer.step()``, which then takes exactly the looked-ahead
values (tested against ``torch.optim`` step for step), so a momentum buffer is never dropped or
desynchronised, and a learning-rate scheduler acting on ``param_groups`` reaches both.

``horizon``: with ``"step"`` (the papers' one-step objective) the look-ahead is the next step.
With ``"momentum"`` it is where the optimizer will have moved the weights once the momentum
carried by this step has run out, assuming no further gradient (weight decay included in this
step only): for SGD with momentum ``mu`` the current gradient's total displacement is
``lr / (1 - mu)`` instead of the one step's ``lr`` (heavy ball) or ``lr (1 + mu)`` (Nesterov);
for Adam ``m`` keeps decaying by ``beta1`` with the step's denominator held. A one-step
objective credits a loss for a tenth of what SGD with momentum 0.9 will do with its gradient
(docs/losses.md, "Why AdaLFL drifted"); the horizon form credits all of it.

Adam's denominator ``sqrt(v_hat) + eps`` enters with its value but without its derivative: the
current gradient's share of ``v`` is ``1 - beta2`` (0.001 by default), and the derivative of the
square root at ``v = 0`` is infinite for parameters whose gradient has been exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from npbml.params import Params

__all__ = ["HORIZONS", "TorchOptimStep"]

HORIZONS = ("step", "momentum")
Horizon = Literal["step", "momentum"]


def _sgd(p: torch.Tensor, g: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any],
         horizon: str) -> torch.Tensor:  # fmt: skip
    """``torch.optim.SGD``'s update of one tensor, as a new tensor (PyTorch docs, "SGD")."""
    lr, mu, tau = group["lr"], group["momentum"], group["dampening"]
    d = -g if group["maximize"] else g
    if group["weight_decay"]:
        d = d + group["weight_decay"] * p
    if not mu:
        return p - lr * d
    buf = state.get("momentum_buffer")
    buf = d if buf is None else mu * buf + (1 - tau) * d
    step = d + mu * buf if group["nesterov"] else buf
    if horizon == "momentum":  # later steps add mu^k * buf (heavy ball) or mu^(k+1) * buf
        step = step + (mu**2 if group["nesterov"] else mu) / (1 - mu) * buf
    return p - lr * step


def _adam(p: torch.Tensor, g: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any],
          horizon: str) -> torch.Tensor:  # fmt: skip
    """``torch.optim.Adam``/``AdamW``'s update of one tensor, as a new tensor (PyTorch docs)."""
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    g = -g if group["maximize"] else g
    decoupled = bool(group.get("decoupled_weight_decay", False))
    if wd and decoupled:
        p = p * (1 - lr * wd)
    elif wd:
        g = g + wd * p
    t = int(state["step"]) + 1 if "step" in state else 1
    m = state.get("exp_avg")
    v = state.get("exp_avg_sq")
    m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
    v = (1 - b2) * g.detach() ** 2 if v is None else b2 * v + (1 - b2) * g.detach() ** 2
    if group["amsgrad"]:
        v_max = state.get("max_exp_avg_sq")
        v = v if v_max is None else torch.maximum(v_max, v)
    denom = (v.sqrt() / math.sqrt(1 - b2**t) + eps).detach()
    step = m / (1 - b1**t)
    if horizon == "momentum":  # step t+k adds b1^k m / (1 - b1^(t+k)); bias corrections -> 1
        step = step + b1 / (1 - b1) * m
    return p - lr * step / denom


class TorchOptimStep:
    """The next step of a live ``torch.optim`` optimizer, differentiable w.r.t. the gradients.

    Example::

        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        look = TorchOptimStep(opt, model)
        new_params = look.step(params, grads)   # grads built with create_graph=True
        ...                                     # meta-objective on new_params, backward
        for k, p in model.named_parameters():
            p.grad = grads[k].detach()
        opt.step()                              # applies exactly new_params (horizon="step")

    Args:
        optimizer: a :class:`torch.optim.SGD`, :class:`~torch.optim.Adam` or
            :class:`~torch.optim.AdamW` over (some of) ``model``'s parameters.
        model: the module whose ``named_parameters()`` name the optimizer's tensors.
        horizon: ``"step"`` (the next step) or ``"momentum"`` (the step plus the displacement
            the optimizer's momentum will still add; see the module docstring).

    Raises:
        TypeError: for another optimizer class (the error lists the supported ones).
        ValueError: for an unknown ``horizon`` or an optimizer tensor ``model`` does not own.
    """

    SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)

    def __init__(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, horizon: Horizon = "step"
    ) -> None:
        if not isinstance(optimizer, self.SUPPORTED):
            names = ", ".join(f"torch.optim.{c.__name__}" for c in self.SUPPORTED)
            raise TypeError(
                f"no differentiable step for {type(optimizer).__name__}: use one of {names}"
            )
        if horizon not in HORIZONS:
            raise ValueError(f"horizon must be one of {HORIZONS}, got {horizon!r}")
        self.optimizer, self.horizon = optimizer, horizon
        self._name_of = {id(p): k for k, p in model.named_parameters()}
        for group in optimizer.param_groups:
            if any(id(p) not in self._name_of for p in group["params"]):
                raise ValueError(
                    "the optimizer holds a tensor that is not a parameter of the model: build it "
                    "over model.parameters()"
                )
        self._rule = _sgd if isinstance(optimizer, torch.optim.SGD) else _adam

    def step(self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> Params:
        """``params`` after the optimizer's step on ``grads`` (both keyed by parameter name).

        Tensors the optimizer does not hold are returned unchanged. Reads the optimizer's current
        ``param_groups`` (so schedules apply) and state; writes nothing.
        """
        out = dict(params)
        # param_groups are read at every call: a scheduler or ``load_state_dict`` replaces them.
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name = self._name_of.get(id(p), "")
                if name in params and name in grads:
                    state = self.optimizer.state.get(p, {})
                    out[name] = self._rule(params[name], grads[name], group, state, self.horizon)
        return out

    def learning_rates(self) -> list[float]:
        """The current ``lr`` of every parameter group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]
