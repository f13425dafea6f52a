"""Differentiable inner-loop SGD (with momentum, Nesterov, weight decay) and learned rates.

The inner loop of MAML (Finn et al. 2017, eq. 1) is theta_{j+1} = theta_j - alpha * g_j. Here every
step returns *new* tensors (no in-place updates) so the meta-gradient can flow through the whole
unroll. The update rule reproduces :class:`torch.optim.SGD` exactly (PyTorch docs, "SGD" algorithm):

    d = P(g) + wd * theta                      (P: preconditioner hook, identity by default)
    b = d                    at the first step
    b = mu * b + (1 - tau) * d                 afterwards (mu momentum, tau dampening)
    d = d + mu * b  (Nesterov)   or   d = b     (heavy ball), when mu != 0
    theta <- theta - alpha * d

``alpha`` may be a float, a (learnable) tensor, or per-parameter tensors (Meta-SGD, Li et al. 2017,
eq. 2: theta' = theta - alpha o grad, with alpha a meta-learned tensor shaped like theta) given as
a :class:`PerParameterLR` module or a mapping. The preconditioner ``P`` maps a gradient dict to a
gradient dict; NPBML's warp preconditioner (docs/methods/npbml.md) plugs in there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import nn

from npbml.params import Params

__all__ = ["InnerSGD", "PerParameterLR", "Preconditioner", "SGDState"]

Preconditioner = Callable[[Params], Params]
# Momentum buffers by parameter name; empty before the first step.
SGDState = dict[str, torch.Tensor]
LRSpec = Union[float, torch.Tensor, Mapping[str, torch.Tensor], "PerParameterLR"]


def _escape(name: str) -> str:
    # ParameterDict keys may not contain "."; "/" never occurs in module parameter names.
    return name.replace(".", "/")


class PerParameterLR(nn.Module):
    """Meta-SGD learning rates: one learnable tensor per adapted parameter, same shape.

    Li et al., "Meta-SGD", arXiv 1707.09835, eq. 2. The rates are ``nn.Parameter``s
    (meta-parameters, updated by the outer optimizer) and every entry starts at ``init``. Calling
    the module returns ``{parameter name: rate tensor}``, which :class:`InnerSGD` (or any other
    inner loop) accepts.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], init: float = 0.4) -> None:
        super().__init__()
        if not params:
            raise ValueError("PerParameterLR needs at least one parameter to give a rate to")
        self.names = list(params)
        self.rates = nn.ParameterDict(
            {
                _escape(n): nn.Parameter(torch.full_like(p.detach(), float(init)))
                for n, p in params.items()
            }
        )

    def forward(self) -> Params:
        return {n: self.rates[_escape(n)] for n in self.names}

    def extra_repr(self) -> str:
        return f"{len(self.names)} tensors"


class InnerSGD(nn.Module):
    """Functional, differentiable SGD: ``state = opt.init(params)``,
    ``new_params, state = opt.step(params, grads, state)``.

    Nothing is modified in place; gradients of the new parameters with respect to the old ones,
    the gradients, the learning rates and the preconditioner's parameters are all available.
    Learnable pieces (a :class:`PerParameterLR`, a tensor ``lr`` that is an ``nn.Parameter``, a
    preconditioner that is an ``nn.Module``) are registered as sub-modules / parameters, so
    ``opt.parameters()`` lists them as meta-parameters.
    """

    def __init__(
        self,
        lr: LRSpec = 0.4,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        preconditioner: Preconditioner | None = None,
    ) -> None:
        super().__init__()
        if momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"InnerSGD momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}"
            )
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                "Nesterov momentum requires momentum > 0 and dampening = 0 (as torch.optim.SGD)"
            )
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.preconditioner = preconditioner  # an nn.Module here is registered as a sub-module
        self._lr_float: float | None = None
        self._lr_map: dict[str, torch.Tensor] | None = None
        # A PerParameterLR sub-module, a tensor (parameter, graph tensor or buffer), or None when
        # the rate is a float (_lr_float) or a mapping (_lr_map).
        self.lr: PerParameterLR | torch.Tensor | None
        if isinstance(lr, (PerParameterLR, nn.Parameter)):
            self.lr = lr
        elif isinstance(lr, torch.Tensor) and lr.requires_grad:
            self.lr = lr  # part of someone else's graph (e.g. produced by a hyper-network)
        elif isinstance(lr, torch.Tensor):
            self.register_buffer("lr", lr.detach().clone(), persistent=False)
        elif isinstance(lr, Mapping):
            self.lr = None
            self._lr_map = dict(lr)
        elif isinstance(lr, (int, float)):
            if lr < 0:
                raise ValueError(f"InnerSGD learning rate must be >= 0, got {lr}")
            self.lr = None
            self._lr_float = float(lr)
        else:
            raise TypeError(
                "InnerSGD lr must be a float, a tensor, a {name: tensor} mapping or a "
                f"PerParameterLR, got {type(lr).__name__}"
            )

    def init(self, params: Mapping[str, torch.Tensor]) -> SGDState:
        """Fresh optimizer state for ``params`` (no momentum buffers yet)."""
        return {}

    def learning_rates(self) -> float | torch.Tensor | Mapping[str, torch.Tensor]:
        """The current rate(s): a float, a tensor, or ``{name: tensor}``."""
        if self._lr_float is not None:
            return self._lr_float
        if self._lr_map is not None:
            return self._lr_map
        if isinstance(self.lr, PerParameterLR):
            return self.lr()
        assert self.lr is not None  # None only with _lr_float or _lr_map set
        return self.lr

    def step(
        self,
        params: Mapping[str, torch.Tensor],
        grads: Mapping[str, torch.Tensor],
        state: SGDState | None = None,
    ) -> tuple[Params, SGDState]:
        """One SGD step on every entry of ``params``; returns new params and new state."""
        if grads.keys() != params.keys():
            missing = sorted(set(params) ^ set(grads))
            raise KeyError(
                f"InnerSGD.step: params and grads must have the same names; differ in {missing}"
            )
        if self.preconditioner is not None:
            grads = self.preconditioner(dict(grads))
        state = {} if state is None else state
        lrs = self.learning_rates()
        mu, wd = self.momentum, self.weight_decay
        new_params: Params = {}
        new_state: SGDState = {}
        for name, p in params.items():
            d = grads[name]
            if wd != 0:
                d = d + wd * p
            if mu != 0:
                buf = state.get(name)
                buf = d if buf is None else mu * buf + (1.0 - self.dampening) * d
                new_state[name] = buf
                d = d + mu * buf if self.nesterov else buf
            lr = lrs[name] if isinstance(lrs, Mapping) else lrs
            new_params[name] = p - lr * d
        return new_params, new_state

    def extra_repr(self) -> str:
        lr: Any = self._lr_float if self._lr_float is not None else "tensor"
        return (
            f"lr={lr}, momentum={self.momentum}, dampening={self.dampening}, "
            f"nesterov={self.nesterov}, weight_decay={self.weight_decay}"
        )
