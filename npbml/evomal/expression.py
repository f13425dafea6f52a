"""Symbolic loss expressions of EvoMAL: primitives, trees, evaluation, canonical form, torch module.

Raymond et al., "Learning Symbolic Model-Agnostic Loss Functions via Meta-Learning", TPAMI 2023
(arXiv 2209.08907), section 3.1 (docs/methods/evomal.md). A loss is an expression tree over the
terminals ``y`` (one-hot target), ``f`` (the prediction f(x): softmax of the logits, or the
sigmoid for a single output) and the constants ``+1`` / ``-1``, with the function set below. The
tree is evaluated elementwise on ``[batch, classes]`` tensors, summed over classes and averaged
over the batch:

    L(y, f) = (1 / B) * sum_b sum_c  expr(y_bc, f_bc)

Trees are stored in prefix (Polish) order as a tuple of primitive names, which makes subtree
slicing (crossover, mutation) a matter of index arithmetic. Every node may carry a learnable
scalar ``w_i`` that multiplies its output (the paper's "loss network" view of a tree, section 3.3);
the scalars are indexed in the same prefix order as the tokens.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Clamp used by the protected log and sqrt (docs/methods/evomal.md).
EPS = 1e-7

TERMINALS: tuple[str, ...] = ("y", "f", "1", "-1")
CONSTANTS: tuple[str, ...] = ("1", "-1")

UNARY: tuple[str, ...] = ("sign", "square", "abs", "log", "sqrt", "tanh")
BINARY: tuple[str, ...] = ("add", "sub", "mul", "div", "min", "max")
FUNCTIONS: tuple[str, ...] = BINARY + UNARY
#: Functions whose two arguments commute (used by the canonical form).
COMMUTATIVE: frozenset[str] = frozenset({"add", "mul", "min", "max"})

ARITY: dict[str, int] = {
    **{t: 0 for t in TERMINALS},
    **{u: 1 for u in UNARY},
    **{b: 2 for b in BINARY},
}


def protected_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """EvoMAL's protected division ``a / sqrt(1 + b^2)``: finite and smooth for every ``b``."""
    return a / torch.sqrt(1.0 + b * b)


def protected_log(a: torch.Tensor) -> torch.Tensor:
    """``log(clamp(|a|, 1e-7))``: defined for every input, bounded below by ``log(1e-7)``."""
    return torch.log(torch.clamp(torch.abs(a), min=EPS))


def protected_sqrt(a: torch.Tensor) -> torch.Tensor:
    """``sqrt(clamp(|a|, 1e-7))``: defined for every input with a finite gradient."""
    return torch.sqrt(torch.clamp(torch.abs(a), min=EPS))


#: Elementwise implementation of every function primitive.
PRIMITIVES: dict[str, Callable[..., torch.Tensor]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": protected_div,
    "min": torch.minimum,
    "max": torch.maximum,
    "sign": torch.sign,
    "square": torch.square,
    "abs": torch.abs,
    "log": protected_log,
    "sqrt": protected_sqrt,
    "tanh": torch.tanh,
}

_INFIX_BINARY = {"add": "+", "sub": "-", "mul": "*"}


def subtree_end(tokens: Sequence[str], start: int) -> int:
    """Index one past the end of the subtree rooted at ``tokens[start]`` (prefix order)."""
    need = 1
    i = start
    while need > 0:
        if i >= len(tokens):
            raise ValueError(f"malformed prefix expression {list(tokens)}: ran out of tokens")
        need += ARITY[tokens[i]] - 1
        i += 1
    return i


def node_depths(tokens: Sequence[str]) -> list[int]:
    """Depth of every node (root = 0), in prefix order."""
    depths: list[int] = []
    stack = [0]  # depth of the next node to be read
    for tok in tokens:
        d = stack.pop()
        depths.append(d)
        stack.extend([d + 1] * ARITY[tok])
    return depths


def validate_tokens(tokens: Sequence[str]) -> tuple[str, ...]:
    """Check that ``tokens`` is one well-formed prefix tree of known primitives; return a tuple."""
    tokens = tuple(tokens)
    unknown = [t for t in tokens if t not in ARITY]
    if unknown:
        raise ValueError(
            f"unknown primitive(s) {unknown}; valid primitives: {', '.join(sorted(ARITY))}"
        )
    if not tokens or subtree_end(tokens, 0) != len(tokens):
        raise ValueError(f"{list(tokens)} is not exactly one prefix expression tree")
    return tokens


@dataclass(frozen=True)
class Expression:
    """An immutable loss expression tree in prefix order (see the module docstring)."""

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", validate_tokens(self.tokens))

    # --- structure -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def height(self) -> int:
        """Tree height as in DEAP: a lone terminal has height 0."""
        return max(node_depths(self.tokens))

    @property
    def has_y_and_f(self) -> bool:
        """Whether the tree reads both the target ``y`` and the prediction ``f`` (EvoMAL's rule)."""
        return "y" in self.tokens and "f" in self.tokens

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(
        self,
        y: torch.Tensor,
        f: torch.Tensor,
        scalars: torch.Tensor | Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Elementwise value of the tree on ``y`` and ``f`` (same shape), before any reduction.

        With ``scalars`` (one per node, prefix order), every node's output is multiplied by its
        scalar, terminals included (EvoMAL section 3.3).
        """
        if scalars is not None:
            scalars = torch.as_tensor(scalars, dtype=f.dtype, device=f.device)
            if scalars.shape != (len(self.tokens),):
                raise ValueError(
                    f"expected {len(self.tokens)} node scalars, got shape {tuple(scalars.shape)}"
                )
        one = torch.ones((), dtype=f.dtype, device=f.device)
        pos = 0

        def rec() -> torch.Tensor:
            nonlocal pos
            i = pos
            tok = self.tokens[i]
            pos += 1
            if tok == "y":
                out = y
            elif tok == "f":
                out = f
            elif tok == "1":
                out = one
            elif tok == "-1":
                out = -one
            else:
                args = [rec() for _ in range(ARITY[tok])]
                out = PRIMITIVES[tok](*args)
            return out * scalars[i] if scalars is not None else out

        out = rec()
        # A subtree of constants is a 0-d tensor; broadcasting gives every loss its full shape.
        return out.expand(torch.broadcast_shapes(out.shape, f.shape))

    def loss(
        self,
        y: torch.Tensor,
        f: torch.Tensor,
        scalars: torch.Tensor | Sequence[float] | None = None,
    ) -> torch.Tensor:
        """The loss: :meth:`evaluate` summed over classes (last dim), averaged over the batch."""
        return self.evaluate(y, f, scalars).sum(dim=-1).mean()

    # --- strings -------------------------------------------------------------------------------
    def to_prefix_string(self) -> str:
        """Functional prefix notation, e.g. ``mul(-1, mul(y, log(f)))``; :meth:`parse` reads it."""
        return _render(
            self.tokens, lambda _i, tok, args: f"{tok}({', '.join(args)})" if args else tok
        )

    def __str__(self) -> str:
        return self.to_infix()

    def to_infix(
        self, scalars: Sequence[float] | torch.Tensor | None = None, digits: int = 4
    ) -> str:
        """Readable infix formula; with ``scalars``, each node is shown as ``w*(node)``.

        ``pdiv(a, b)`` is the protected division ``a / sqrt(1 + b^2)``; ``log`` and ``sqrt`` are
        the protected (clamped) versions; ``f`` is f(x).
        """
        ws = None if scalars is None else [float(w) for w in torch.as_tensor(scalars).tolist()]
        names = {"div": "pdiv"}

        def fmt(i: int, tok: str, args: list[str]) -> str:
            if not args:
                s = "(-1)" if tok == "-1" and ws is not None else tok
            elif tok in _INFIX_BINARY:
                s = f"({args[0]} {_INFIX_BINARY[tok]} {args[1]})"
            else:
                s = f"{names.get(tok, tok)}({', '.join(args)})"
            if ws is None:
                return s
            return f"{ws[i]:.{digits}g}*{s}"

        return _render(self.tokens, fmt)

    def canonical(self) -> str:
        """Canonical string: the cache key of symbolically equal candidates.

        Two rules, both of which preserve the function of ``(y, f)`` exactly:
        (1) every subtree without ``y`` and ``f`` is folded to its numeric value (evaluated with
        the same protected primitives, printed with 12 significant digits), and (2) the two
        arguments of the commutative functions ``add``, ``mul``, ``min``, ``max`` are sorted.
        So ``add(y, f)`` and ``add(f, y)`` share a key, ``sub(y, f)`` and ``sub(f, y)`` do not,
        and ``mul(add(1, 1), f)`` equals ``mul(f, add(1, 1))`` (both ``mul(2, f)``). The key is
        sound (equal keys mean equal functions) but not complete: associativity, distributivity
        and identities such as ``sub(x, x) = 0`` are not normalised. Node scalars are not part of
        the key; they are tuned per candidate.
        """
        return _canonical(self.tokens, 0)[0]

    @classmethod
    def parse(cls, text: str) -> Expression:
        """Read functional prefix notation such as ``mul(-1, mul(y, log(f)))``."""
        pieces = [p for p in re.findall(r"-1|[A-Za-z_]+|\d+|[(),]", text) if p]
        if "".join(pieces) != re.sub(r"\s+", "", text):
            raise ValueError(
                f"cannot parse loss expression {text!r}: use op(arg, ...) with primitives "
                f"{', '.join(sorted(ARITY))}"
            )
        tokens = [p for p in pieces if p not in "(),"]
        try:
            expr = cls(tuple(tokens))
        except ValueError as exc:
            raise ValueError(f"cannot parse loss expression {text!r}: {exc}") from None
        if expr.to_prefix_string().replace(" ", "") != re.sub(r"\s+", "", text):
            raise ValueError(
                f"cannot parse loss expression {text!r}: arguments do not match the arities "
                f"(binary: {', '.join(BINARY)}; unary: {', '.join(UNARY)})"
            )
        return expr

    def to_callable(self, scalars: Sequence[float] | torch.Tensor | None = None) -> EvolvedLoss:
        """This expression as a torch loss module ``loss(logits, targets)``."""
        return EvolvedLoss(self, scalars)


def _render(tokens: Sequence[str], fmt: Callable[[int, str, list[str]], str]) -> str:
    """Fold a prefix tree bottom-up into a string; ``fmt(index, token, args)`` per node."""
    pos = 0

    def rec() -> str:
        nonlocal pos
        i = pos
        tok = tokens[i]
        pos += 1
        return fmt(i, tok, [rec() for _ in range(ARITY[tok])])

    return rec()


def _const_value(tokens: Sequence[str], start: int) -> float:
    sub = Expression(tuple(tokens[start : subtree_end(tokens, start)]))
    zero = torch.zeros((), dtype=torch.float64)
    return float(sub.evaluate(zero, zero))


def _fmt_number(v: float) -> str:
    if v == 0:
        return "0"  # folds -0.0 into 0
    if math.isnan(v):
        return "nan"
    return format(v, ".12g")


def _canonical(tokens: Sequence[str], start: int) -> tuple[str, int]:
    end = subtree_end(tokens, start)
    tok = tokens[start]
    if tok == "y" or tok == "f":
        return tok, end
    if not any(t in ("y", "f") for t in tokens[start:end]):
        return _fmt_number(_const_value(tokens, start)), end
    args = []
    i = start + 1
    for _ in range(ARITY[tok]):
        s, i = _canonical(tokens, i)
        args.append(s)
    if tok in COMMUTATIVE:
        args.sort()
    return f"{tok}({', '.join(args)})", end


def loss_inputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EvoMAL's terminals from a model's logits ``[B, C]`` and targets.

    ``C > 1``: ``f = softmax(logits)``, ``y = one_hot(targets, C)`` (targets are class indices).
    ``C == 1``: ``f = sigmoid(logits)``, ``y = targets`` as floats in ``[0, 1]`` shaped ``[B, 1]``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, classes], got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        y = targets.to(logits.dtype).reshape(-1, 1)
        return y, torch.sigmoid(logits)
    if targets.dtype.is_floating_point:
        raise ValueError("targets must be integer class indices when there is more than one output")
    return F.one_hot(targets.long(), logits.shape[1]).to(logits.dtype), torch.softmax(logits, -1)


class EvolvedLoss(nn.Module):
    """A (tuned) EvoMAL expression as a loss module: ``loss = module(logits, targets)``.

    The node scalars are an ``nn.Parameter`` (prefix order) so the module can be tuned further or
    frozen with ``requires_grad_(False)``.
    """

    def __init__(
        self, expression: Expression | str, scalars: Sequence[float] | torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if isinstance(expression, str):
            expression = Expression.parse(expression)
        self.expression = expression
        n = len(expression)
        w = torch.ones(n) if scalars is None else torch.as_tensor(scalars, dtype=torch.float32)
        if w.shape != (n,):
            raise ValueError(f"expected {n} node scalars, got shape {tuple(w.shape)}")
        self.scalars = nn.Parameter(w.detach().clone().float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y, f = loss_inputs(logits, targets)
        return self.expression.loss(y, f, self.scalars.to(f.dtype))

    def extra_repr(self) -> str:
        return self.expression.to_infix(self.scalars.detach())

    def to_dict(self) -> dict:
        """JSON-ready description (prefix string, node scalars, readable formulas)."""
        return {
            "expression": self.expression.to_prefix_string(),
            "scalars": [float(w) for w in self.scalars.detach().tolist()],
            "infix": self.expression.to_infix(),
            "infix_tuned": self.expression.to_infix(self.scalars.detach()),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (readable by :func:`load_evolved_loss`)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load_evolved_loss(path: str | os.PathLike) -> EvolvedLoss:
    """Load a loss saved by :meth:`EvolvedLoss.save` or an EvoMAL search (``best.json``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "best.json"
    if not p.exists():
        raise FileNotFoundError(
            f"no evolved loss at {p}: pass a JSON file written by `npbml evolve` (its best.json) "
            f"or by EvolvedLoss.save"
        )
    d = json.loads(p.read_text())
    if "expression" not in d:
        raise ValueError(f"{p} has no 'expression' key; is it an EvoMAL loss file?")
    return EvolvedLoss(Expression.parse(d["expression"]), d.get("scalars"))
