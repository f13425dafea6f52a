"""Genetic-programming operators of EvoMAL over prefix-order expression trees.

Raymond et al., TPAMI 2023 (arXiv 2209.08907), section 3.2 (docs/methods/evomal.md): ramped
half-and-half initialisation, one-point crossover, uniform subtree mutation, the static height
limit, the "must read y and f(x)" repair, and DEAP's double tournament (``selDoubleTournament``
with ``fitness_first=True``). Every operator draws its randomness from an explicit
``random.Random`` so a search is a pure function of its seed (and resumable from the RNG state).
Fitness here is an *error*: lower is better.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from npbml.evomal.expression import (
    ARITY,
    BINARY,
    FUNCTIONS,
    TERMINALS,
    Expression,
    node_depths,
    subtree_end,
)

Tokens = tuple[str, ...]


def _generate(rng: random.Random, min_height: int, max_height: int, grow: bool) -> Tokens:
    """DEAP's genFull / genGrow: a random tree whose height is drawn in [min_height, max_height].

    Full: functions at every depth below the drawn height, terminals at it. Grow: below
    ``min_height`` functions only; after that a terminal with probability
    ``|terminals| / |primitives|`` (DEAP's rule), and always at the drawn height.
    """
    if min_height < 0 or max_height < min_height:
        raise ValueError(f"need 0 <= min_height <= max_height, got {min_height}, {max_height}")
    height = rng.randint(min_height, max_height)
    terminal_ratio = len(TERMINALS) / (len(TERMINALS) + len(FUNCTIONS))
    out: list[str] = []
    stack = [0]
    while stack:
        depth = stack.pop()
        if depth == height:
            leaf = True
        elif grow:
            leaf = depth >= min_height and rng.random() < terminal_ratio
        else:
            leaf = False
        tok = rng.choice(TERMINALS) if leaf else rng.choice(FUNCTIONS)
        out.append(tok)
        stack.extend([depth + 1] * ARITY[tok])
    return tuple(out)


def gen_full(rng: random.Random, min_height: int, max_height: int) -> Tokens:
    """A full tree (DEAP genFull)."""
    return _generate(rng, min_height, max_height, grow=False)


def gen_grow(rng: random.Random, min_height: int, max_height: int) -> Tokens:
    """A grown tree (DEAP genGrow)."""
    return _generate(rng, min_height, max_height, grow=True)


def gen_half_and_half(rng: random.Random, min_height: int, max_height: int) -> Tokens:
    """Ramped half-and-half (DEAP genHalfAndHalf): full or grow with equal probability."""
    return (gen_full if rng.random() < 0.5 else gen_grow)(rng, min_height, max_height)


def height(tokens: Sequence[str]) -> int:
    """Tree height (a lone terminal has height 0)."""
    return max(node_depths(tokens))


def repair(tokens: Sequence[str], rng: random.Random, max_height: int) -> Tokens:
    """Make a tree read both ``y`` and ``f`` (EvoMAL's validity rule), keeping its height limit.

    A tree that lacks either has one node replaced by ``op(y, f)`` with ``op`` a random binary
    function. The replaced node is a random terminal at depth <= ``max_height - 1`` (so the new
    subtree still fits); only when no terminal is that shallow (a full tree of height
    ``max_height``) is a random node at depth ``max_height - 1`` replaced instead. Any such
    replacement makes the tree contain both terminals, since ``op(y, f)`` does.
    """
    tokens = tuple(tokens)
    if "y" in tokens and "f" in tokens:
        return tokens
    if max_height < 1:
        raise ValueError("max_height must be >= 1 to fit op(y, f)")
    depths = node_depths(tokens)
    limit = max_height - 1
    spots = [i for i, t in enumerate(tokens) if ARITY[t] == 0 and depths[i] <= limit]
    if not spots:
        spots = [i for i, d in enumerate(depths) if d == limit]
    i = rng.choice(spots)
    new = (rng.choice(BINARY), "y", "f")
    return tokens[:i] + new + tokens[subtree_end(tokens, i) :]


def crossover_one_point(
    a: Sequence[str], b: Sequence[str], rng: random.Random
) -> tuple[Tokens, Tokens]:
    """One-point subtree crossover (DEAP cxOnePoint, untyped): swap a random non-root subtree.

    Trees of one node are returned unchanged (there is no non-root point to cut).
    """
    a, b = tuple(a), tuple(b)
    if len(a) < 2 or len(b) < 2:
        return a, b
    i = rng.randrange(1, len(a))
    j = rng.randrange(1, len(b))
    ei, ej = subtree_end(a, i), subtree_end(b, j)
    return a[:i] + b[j:ej] + a[ei:], b[:j] + a[i:ei] + b[ej:]


def mutate_subtree(
    tokens: Sequence[str], rng: random.Random, min_height: int = 0, max_height: int = 2
) -> Tokens:
    """Uniform subtree mutation (DEAP mutUniform with genGrow): replace a random subtree."""
    tokens = tuple(tokens)
    i = rng.randrange(len(tokens))
    new = gen_grow(rng, min_height, max_height)
    return tokens[:i] + new + tokens[subtree_end(tokens, i) :]


def static_limit(child: Sequence[str], parent: Sequence[str], max_height: int) -> Tokens:
    """DEAP's staticLimit: a child taller than ``max_height`` is replaced by its parent."""
    return tuple(child) if height(child) <= max_height else tuple(parent)


def vary(
    population: Sequence[Tokens],
    rng: random.Random,
    crossover_prob: float,
    mutation_prob: float,
    max_height: int,
    mutation_max_height: int = 2,
) -> list[Tokens]:
    """DEAP's varAnd on selected parents: pairwise crossover, then per-individual mutation.

    Every child respects ``max_height`` (static limit) and reads ``y`` and ``f`` (repair).
    """
    off = [tuple(t) for t in population]
    for k in range(1, len(off), 2):
        if rng.random() < crossover_prob:
            c1, c2 = crossover_one_point(off[k - 1], off[k], rng)
            off[k - 1] = static_limit(c1, off[k - 1], max_height)
            off[k] = static_limit(c2, off[k], max_height)
    for k in range(len(off)):
        if rng.random() < mutation_prob:
            off[k] = static_limit(
                mutate_subtree(off[k], rng, 0, mutation_max_height), off[k], max_height
            )
    return [repair(t, rng, max_height) for t in off]


def sel_double_tournament(
    individuals: Sequence[Tokens],
    fitness: Callable[[Tokens], float],
    k: int,
    rng: random.Random,
    fitness_size: int = 4,
    parsimony_size: float = 1.0,
) -> list[Tokens]:
    """DEAP's selDoubleTournament with ``fitness_first=True`` (Luke & Panait 2002).

    Each of the ``k`` picks runs two fitness tournaments (``fitness_size`` aspirants drawn with
    replacement; the lowest error wins, the first one on ties), then a size tournament between
    the two winners: the smaller tree wins with probability ``parsimony_size / 2`` (0.5 when the
    sizes are equal). ``parsimony_size`` lies in [1, 2]; 1 means no parsimony pressure.
    """
    if not 1.0 <= parsimony_size <= 2.0:
        raise ValueError(f"parsimony_size must be in [1, 2], got {parsimony_size}")
    if fitness_size < 1:
        raise ValueError(f"fitness_size must be >= 1, got {fitness_size}")

    def fit_tournament() -> Tokens:
        aspirants = [rng.choice(individuals) for _ in range(fitness_size)]
        return min(aspirants, key=fitness)

    chosen = []
    for _ in range(k):
        prob = parsimony_size / 2.0
        ind1, ind2 = fit_tournament(), fit_tournament()
        if len(ind1) > len(ind2):
            ind1, ind2 = ind2, ind1
        elif len(ind1) == len(ind2):
            prob = 0.5
        chosen.append(ind1 if rng.random() < prob else ind2)
    return chosen


def random_population(
    rng: random.Random, size: int, min_height: int, max_height: int, height_limit: int
) -> list[Tokens]:
    """``size`` ramped half-and-half trees, each repaired to read ``y`` and ``f``."""
    return [
        repair(gen_half_and_half(rng, min_height, max_height), rng, height_limit)
        for _ in range(size)
    ]


def is_valid(tokens: Sequence[str], max_height: int) -> bool:
    """Whether ``tokens`` is a well-formed tree reading y and f within the height limit."""
    e = Expression(tuple(tokens))
    return e.has_y_and_f and e.height <= max_height
