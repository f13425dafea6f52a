"""Parameter dictionaries for functional (stateless) forward passes.

Gradient-based meta-learning (MAML, Finn et al. 2017, eq. 1) evaluates one network at many
parameter values theta_j of the same architecture. Instead of copying modules per task, the
toolkit keeps parameters in plain ``dict[str, Tensor]`` keyed by ``module.named_parameters()``
names and runs the module through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]

__all__ = [
    "Params",
    "functional_forward",
    "match_names",
    "named_params",
    "split_params",
    "strip_prefix",
    "tensor_paths",
]


def named_params(module: nn.Module, *, trainable_only: bool = False) -> Params:
    """All parameters of ``module`` as an ordered ``{name: Parameter}`` dict (no copies).

    With ``trainable_only`` the parameters with ``requires_grad=False`` are left out.
    """
    return {
        name: p for name, p in module.named_parameters() if p.requires_grad or not trainable_only
    }


def _as_patterns(patterns: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    out = tuple(patterns)
    bad = [p for p in out if not isinstance(p, str)]
    if bad:
        raise TypeError(
            f"{what} patterns must be strings (fnmatch globs like 'head.*'), got {bad!r}"
        )
    return out


def match_names(names: Iterable[str], patterns: str | Iterable[str] | None) -> list[str]:
    """Names that match at least one fnmatch pattern (e.g. ``"head.*"``, ``"blocks.3.*"``)."""
    pats = _as_patterns(patterns, "name")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


def split_params(
    params: Mapping[str, torch.Tensor],
    adapt: str | Sequence[str] | None = ("*",),
    freeze: str | Sequence[str] | None = (),
    *,
    require_match: bool = True,
) -> tuple[Params, Params]:
    """Split ``params`` into ``(adapted, rest)`` by fnmatch name patterns, preserving order.

    A parameter is *adapted* (updated by the inner loop) when its name matches one of ``adapt``
    and none of ``freeze``; every other parameter goes to ``rest``. With ``require_match`` a
    pattern that matches no name raises ``ValueError`` (a typo would otherwise silently adapt
    nothing), as does an empty adapted set.
    """
    adapt_p = _as_patterns(adapt, "adapt")
    freeze_p = _as_patterns(freeze, "freeze")
    names = list(params)
    if require_match:
        for p in adapt_p + freeze_p:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(
                    f"parameter pattern {p!r} matches no parameter; available names: "
                    f"{names[:12]}{' ...' if len(names) > 12 else ''}"
                )
    frozen = set(match_names(names, freeze_p))
    adapted_names = [n for n in match_names(names, adapt_p) if n not in frozen]
    if require_match and not adapted_names:
        raise ValueError(
            f"no parameter is adapted: adapt={list(adapt_p)} freeze={list(freeze_p)}; "
            "give at least one adapt pattern that a non-frozen parameter matches"
        )
    chosen = set(adapted_names)
    adapted = {n: params[n] for n in names if n in chosen}
    rest = {n: params[n] for n in names if n not in chosen}
    return adapted, rest


def strip_prefix(params: Mapping[str, torch.Tensor], prefix: str) -> Params:
    """``{name[len(prefix):]: t}`` for names starting with ``prefix`` (e.g. ``"head."``)."""
    n = len(prefix)
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}


class _MethodCall(nn.Module):
    """Routes ``forward`` to another method of a wrapped module, for functional_call."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, self.method)(*args, **kwargs)


def tensor_paths(module: nn.Module) -> dict[str, list[str]]:
    """``{canonical name: every attribute path holding that tensor}`` for parameters and buffers.

    The canonical name is the one ``named_parameters()`` / ``named_buffers()`` report (first
    occurrence). A tensor has several paths when two different modules hold it (tied weights,
    e.g. an embedding and a decoder), and one path when one module is reachable under several
    names (a submodule registered twice, as learn2learn's ``OmniglotCNN`` does with ``base`` and
    ``features.1``): each (module object, attribute) pair is listed once.
    """
    canonical: dict[int, str] = {}
    for name, t in module.named_parameters():
        canonical.setdefault(id(t), name)
    for name, b in module.named_buffers():
        canonical.setdefault(id(b), name)
    paths: dict[str, list[str]] = {}
    for prefix, sub in module.named_modules():  # each module object once
        for table in (sub._parameters, sub._buffers):
            for attr, t in table.items():
                if t is not None and id(t) in canonical:
                    full = f"{prefix}.{attr}" if prefix else attr
                    paths.setdefault(canonical[id(t)], []).append(full)
    return paths


def _substitute(
    module: nn.Module, params: Mapping[str, torch.Tensor], args: tuple, kwargs: dict
) -> Any:
    """``functional_call`` that leaves ``module`` unchanged even when a submodule is shared.

    With its default ``tie_weights=True``, ``torch.func.functional_call`` (torch 2.13) replaces
    the tensors of a submodule reachable under two names but restores only one of them, so the
    substituted (non-leaf) tensors stay in the module after the call (pytorch/pytorch#164759,
    fix proposed in PR #195593). Substituting every (module, attribute) pair exactly once with
    ``tie_weights=False`` is both correct for tied weights and restores everything.
    """
    paths = tensor_paths(module)
    expanded: dict[str, torch.Tensor] = {}
    for name, value in params.items():
        for path in paths.get(name, (name,)):
            expanded[path] = value
    return functional_call(module, expanded, args, kwargs, strict=False, tie_weights=False)


def functional_forward(
    module: nn.Module,
    params: Mapping[str, torch.Tensor] | None,
    *args: Any,
    method: str = "forward",
    **kwargs: Any,
) -> Any:
    """Call ``module(*args, **kwargs)`` with the tensors in ``params`` in place of its own.

    Entries missing from ``params`` (for example the frozen or not-adapted parameters, and the
    buffers) are taken from the module itself, so ``params`` may hold only the adapted subset.
    ``method`` calls another method (e.g. ``"features"``) under the same substitution. The
    module is not modified: this is :func:`torch.func.functional_call` (no deep copies), with
    tied weights and shared submodules handled (:func:`tensor_paths`).
    """
    if not params:
        return getattr(module, method)(*args, **kwargs)
    if method == "forward":
        return _substitute(module, params, args, kwargs)
    wrapper = _MethodCall(module, method)
    prefixed = {"module." + k: v for k, v in params.items()}
    return _substitute(wrapper, prefixed, args, kwargs)
