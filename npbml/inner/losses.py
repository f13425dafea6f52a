"""Inner-loop losses: the pluggable objective minimised on the support set.

Protocol. An inner loss is any callable ``loss_fn(logits, targets) -> scalar tensor`` (default
:func:`torch.nn.functional.cross_entropy`). A loss that needs more than the support logits (NPBML's
learned loss M uses the adapted parameters and the query inputs, docs/methods/npbml.md) declares
``**kwargs`` (or keyword-only parameters named like context keys) in its signature; it is then
called as ``loss_fn(logits, targets, **context)`` with the context keys

    params      the current adapted parameters {name: tensor} (differentiable)
    step        inner step index j (0-based)
    support_x   support inputs
    query_x     query inputs, or None (query labels are never passed)
    learner     the learner running the inner loop (e.g. ``learner(x, params)`` for a forward)

A loss whose signature takes only ``(logits, targets)`` never receives the context. If the loss is
an ``nn.Module`` its parameters are meta-parameters of the learner that holds it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CONTEXT_KEYS", "InnerLoss", "accepts_context", "call_inner_loss", "cross_entropy"]

InnerLoss = Callable[..., torch.Tensor]
CONTEXT_KEYS = ("params", "step", "support_x", "query_x", "learner")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (MAML's inner loss, Finn et al. 2017 section 3.1)."""
    return F.cross_entropy(logits, targets)


def accepts_context(loss_fn: Callable[..., Any]) -> bool | tuple[str, ...]:
    """True if ``loss_fn`` takes ``**kwargs``; else the context keys it names; () if none."""
    target = loss_fn.forward if isinstance(loss_fn, torch.nn.Module) else loss_fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: plain (logits, targets)
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return True
    return tuple(k for k in CONTEXT_KEYS if k in sig.parameters)


def call_inner_loss(
    loss_fn: InnerLoss,
    logits: torch.Tensor,
    targets: torch.Tensor,
    context: Mapping[str, Any],
    wants: bool | tuple[str, ...],
) -> torch.Tensor:
    """Call ``loss_fn`` following the protocol above (``wants`` from :func:`accepts_context`)."""
    if wants is True:
        loss = loss_fn(logits, targets, **context)
    elif wants:
        loss = loss_fn(logits, targets, **{k: context[k] for k in wants})
    else:
        loss = loss_fn(logits, targets)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            "the inner loss must return a scalar tensor (reduce over the batch, e.g. mean); got "
            f"{type(loss).__name__} {getattr(loss, 'shape', '')}"
        )
    return loss
