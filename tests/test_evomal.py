"""Tests of EvoMAL (Raymond et al., TPAMI 2023): expressions, GP operators, tuning, search."""

from __future__ import annotations

import argparse
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from npbml.evomal import (
    WORST_FITNESS,
    Evaluator,
    EvolveConfig,
    EvolvedLoss,
    EvoMALSearch,
    Expression,
    FitnessData,
    add_evolve_parser,
    class_dataset_data,
    gaussian_mixture,
    load_evolved_loss,
    run_evolve,
)
from npbml.evomal.config import DataConfig, RejectionConfig
from npbml.evomal.expression import BINARY, TERMINALS, UNARY, subtree_end
from npbml.evomal.gp import (
    crossover_one_point,
    gen_full,
    height,
    mutate_subtree,
    random_population,
    repair,
    sel_double_tournament,
    static_limit,
    vary,
)
from npbml.evomal.search import fitness_run, load_fitness_data, rejection_test, stage_generator
from npbml.evomal.tuning import init_scalars, tune_scalars, unrolled_meta_loss

CE = "mul(-1, mul(y, log(f)))"


def tiny_config(**search) -> EvolveConfig:
    return EvolveConfig.from_dict(
        {
            "seed": 3,
            "search": {"population": 6, "generations": 3, "init_max_height": 3, **search},
            "tuning": {"meta_steps": 3, "batch_size": 32},
            "rejection": {"steps": 10, "num_examples": 64},
            "fitness": {"train_steps": 15, "batch_size": 32},
            "data": {"num_classes": 3, "dim": 4, "train_per_class": 24, "val_per_class": 16},
            "model": {"hidden": [8]},
        }
    )


# --- primitives and evaluation -----------------------------------------------------------------
def ev(text: str, y: float, f: float) -> float:
    yt = torch.tensor([y], dtype=torch.float64)
    ft = torch.tensor([f], dtype=torch.float64)
    return Expression.parse(text).evaluate(yt, ft)[0].item()


def test_primitives_hand_computed():
    assert ev("div(y, f)", 3.0, 4.0) == pytest.approx(3.0 / math.sqrt(17.0))
    assert ev("div(y, f)", -2.0, 0.0) == pytest.approx(-2.0)  # protected: no division by zero
    assert ev("log(f)", 0.0, 0.0) == pytest.approx(math.log(1e-7))  # clamped at 1e-7
    assert ev("log(f)", 0.0, -math.e) == pytest.approx(1.0)  # log |x|
    assert ev("sqrt(f)", 0.0, -9.0) == pytest.approx(3.0)
    assert ev("sqrt(f)", 0.0, 0.0) == pytest.approx(math.sqrt(1e-7))
    assert ev("sign(f)", 0.0, -0.3) == -1.0
    assert ev("square(sub(y, f))", 1.0, 0.25) == pytest.approx(0.5625)
    assert ev("abs(sub(f, y))", 1.0, 0.25) == pytest.approx(0.75)
    assert ev("tanh(f)", 0.0, 0.5) == pytest.approx(math.tanh(0.5))
    assert ev("min(y, f)", 1.0, 0.25) == 0.25
    assert ev("max(y, f)", 1.0, 0.25) == 1.0
    assert ev("add(1, -1)", 5.0, 7.0) == 0.0  # constants broadcast to the data shape


def test_node_scalars_multiply_every_node():
    e = Expression.parse("add(y, f)")
    y, f = torch.tensor([1.0]), torch.tensor([0.5])
    out = e.evaluate(y, f, torch.tensor([2.0, 3.0, 5.0])).item()
    assert out == pytest.approx(2.0 * (3.0 * 1.0 + 5.0 * 0.5))
    with pytest.raises(ValueError, match="node scalars"):
        e.evaluate(y, f, torch.ones(2))


def test_cross_entropy_expression_matches_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 5, (16,), generator=g)
    loss = EvolvedLoss(CE).double()(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))


def test_single_output_uses_sigmoid():
    logits = torch.tensor([[0.3], [-1.2]], dtype=torch.float64)
    targets = torch.tensor([1.0, 0.0], dtype=torch.float64)
    bce = "sub(mul(-1, mul(y, log(f))), mul(sub(1, y), log(sub(1, f))))"
    loss = EvolvedLoss(bce).double()(logits, targets)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits[:, 0], targets))


def test_parse_roundtrip_and_errors():
    e = Expression.parse("max(sub(y, f), div(-1, sqrt(f)))")
    assert Expression.parse(e.to_prefix_string()) == e
    with pytest.raises(ValueError, match="unknown primitive"):
        Expression.parse("exp(f)")
    with pytest.raises(ValueError):
        Expression.parse("add(y)")
    with pytest.raises(ValueError):
        Expression.parse("log(y, f)")


def test_infix_shows_formula_and_scalars():
    e = Expression.parse("sub(1, min(y, f))")
    assert e.to_infix() == "(1 - min(y, f))"
    assert e.to_infix([2, 1, 0.5, 1, 1]) == "2*(1*1 - 0.5*min(1*y, 1*f))"


# --- canonical strings -------------------------------------------------------------------------
def test_canonical_equivalence():
    c = lambda s: Expression.parse(s).canonical()  # noqa: E731
    assert c("add(y, f)") == c("add(f, y)")
    assert c("mul(y, max(f, y))") == c("mul(max(y, f), y)")
    assert c("sub(y, f)") != c("sub(f, y)")
    assert c("div(y, f)") != c("div(f, y)")
    assert c("mul(add(1, 1), f)") == c("mul(f, add(1, 1))") == "mul(2, f)"
    assert c("add(sub(1, 1), f)") == "add(0, f)"
    assert c("mul(f, square(add(1, 1)))") == c("mul(f, add(add(1, 1), add(1, 1)))")


def trees(max_depth: int = 4):
    """Hypothesis strategy over prefix token tuples of height <= max_depth."""

    def build(depth: int):
        leaf = st.sampled_from(TERMINALS).map(lambda t: (t,))
        if depth == 0:
            return leaf
        sub = build(depth - 1)
        un = st.tuples(st.sampled_from(UNARY), sub).map(lambda p: (p[0], *p[1]))
        bi = st.tuples(st.sampled_from(BINARY), sub, sub).map(lambda p: (p[0], *p[1], *p[2]))
        return st.one_of(leaf, un, bi)

    return build(max_depth)


@settings(max_examples=60, deadline=None)
@given(trees(4), st.integers(0, 10_000))
def test_canonical_is_sound_under_commuting(tokens, seed):
    """Swapping the arguments of a commutative node keeps the key and the function."""
    rng = random.Random(seed)
    comm = [i for i, t in enumerate(tokens) if t in ("add", "mul", "min", "max")]
    e = Expression(tokens)
    if not comm:
        return
    i = rng.choice(comm)
    a0 = i + 1
    a1 = subtree_end(tokens, a0)
    end = subtree_end(tokens, a1)
    swapped = Expression(tokens[:a0] + tokens[a1:end] + tokens[a0:a1] + tokens[end:])
    assert swapped.canonical() == e.canonical()
    g = torch.Generator().manual_seed(seed)
    y = F.one_hot(torch.randint(0, 3, (5,), generator=g), 3).double()
    f = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), -1)
    torch.testing.assert_close(swapped.evaluate(y, f), e.evaluate(y, f), equal_nan=True)


# --- GP operators ------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(trees(5), st.integers(0, 10_000), st.integers(1, 6))
def test_repair_always_reads_y_and_f(tokens, seed, max_height):
    tokens = tokens if height(tokens) <= max_height else ("f",)
    out = repair(tokens, random.Random(seed), max_height)
    assert "y" in out and "f" in out
    assert height(out) <= max_height
    Expression(out)  # well formed
    if "y" in tokens and "f" in tokens:
        assert out == tokens


def test_repair_of_full_tree_at_the_height_limit():
    rng = random.Random(0)
    full = ("add",) + ("mul", "1", "-1") * 2  # height 2, all leaves at depth 2, no y or f
    out = repair(full, rng, max_height=2)
    assert height(out) == 2 and "y" in out and "f" in out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 7))
def test_variation_respects_max_height(seed, max_height):
    rng = random.Random(seed)
    pop = random_population(rng, 8, 0, min(4, max_height), max_height)
    for _ in range(3):
        pop = vary(pop, rng, 0.9, 0.9, max_height, mutation_max_height=3)
        for t in pop:
            assert height(t) <= max_height and "y" in t and "f" in t
    a, b = gen_full(rng, 3, 3), gen_full(rng, 3, 3)
    c1, c2 = crossover_one_point(a, b, rng)
    assert sorted(c1 + c2) == sorted(a + b)  # subtrees are exchanged, nothing lost
    m = mutate_subtree(a, rng, 0, 2)
    Expression(m)
    assert static_limit(m, a, height(m)) == m
    if height(m) > 0:
        assert static_limit(m, a, height(m) - 1) == a


def test_double_tournament_semantics():
    small, large = ("f",), ("add", "y", "f")
    fit = {small: 0.5, large: 0.5}.__getitem__
    n = 4000

    def frac_large(parsimony: float) -> float:
        picks = sel_double_tournament([small, large], fit, n, random.Random(1), 2, parsimony)
        return sum(p == large for p in picks) / n

    # Two fitness winners; the smaller wins the size duel with prob parsimony/2 when they differ.
    # P(large) = P(both large) + P(differ) * (1 - parsimony/2) = 1/4 + 1/2 * (1 - parsimony/2).
    assert frac_large(1.0) == pytest.approx(0.5, abs=0.03)  # no parsimony pressure
    assert frac_large(2.0) == pytest.approx(0.25, abs=0.03)
    # Fitness pressure: with tournaments of 3, the best wins unless absent from all 3 draws.
    good, bad = ("y",), ("f",)
    picks = sel_double_tournament(
        [good, bad], {good: 0.1, bad: 0.9}.__getitem__, n, random.Random(2), 3, 1.0
    )
    assert sum(p == good for p in picks) / n == pytest.approx(1 - 0.5**3, abs=0.03)
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        sel_double_tournament([good], fit, 1, random.Random(0), 2, 2.5)


# --- tuning ------------------------------------------------------------------------------------
def _tiny_problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3).double()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, params, x, y


def test_meta_gradient_matches_finite_differences():
    model, params, x, y = _tiny_problem()
    e = Expression.parse("add(mul(-1, mul(y, log(f))), square(sub(f, y)))")
    w0 = init_scalars(len(e), torch.Generator().manual_seed(1), std=0.1, dtype=torch.float64)
    w = w0.clone().requires_grad_(True)

    def meta(wv: torch.Tensor) -> torch.Tensor:
        return unrolled_meta_loss(e, wv, model, params, x[:6], y[:6], x[6:], y[6:], 0.5)[0]

    (grad,) = torch.autograd.grad(meta(w), w)
    eps = 1e-6
    fd = torch.zeros_like(w0)
    for i in range(len(w0)):
        d = torch.zeros_like(w0)
        d[i] = eps
        fd[i] = (meta(w0 + d) - meta(w0 - d)).detach() / (2 * eps)
    assert grad.abs().max() > 1e-4  # the check is not vacuous
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)


def test_tuning_changes_scalars_and_lowers_meta_loss():
    model, params, x, y = _tiny_problem()
    e = Expression.parse(CE)
    w0 = init_scalars(len(e), torch.Generator().manual_seed(1), dtype=torch.float64)
    w, finite = tune_scalars(
        e, w0, model, params, x, y, torch.Generator().manual_seed(2), 15, 0.05, 0.5, 12
    )
    assert finite and not torch.allclose(w, w0)

    def meta(wv):
        return unrolled_meta_loss(e, wv, model, params, x, y, x, y, 0.5)[0].item()

    assert meta(w) < meta(w0)


# --- rejection and fitness ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CE, "ok"),
        ("square(sub(y, f))", "ok"),
        ("mul(y, f)", "rejected"),  # pushes the target probability down
        ("mul(sub(1, 1), mul(y, f))", "rejected"),  # identically zero
        ("sign(sub(y, f))", "rejected"),  # zero gradient almost everywhere
    ],
)
def test_rejection_protocol(text, expected):
    e = Expression.parse(text)
    status = rejection_test(
        e, torch.ones(len(e)), 4, RejectionConfig(), torch.Generator().manual_seed(0)
    )
    assert status == expected


OVERFLOW = "mul(" + "square(" * 8 + "add(1, 1)" + ")" * 8 + ", mul(y, f))"  # 2^256 -> inf


def test_nonfinite_candidate_gets_worst_fitness():
    e = Expression.parse(OVERFLOW)
    assert e.height <= 10
    cfg = tiny_config()
    evaluator = Evaluator(cfg)
    res = evaluator.evaluate(e.tokens)
    assert res.status == "nonfinite" and res.fitness == WORST_FITNESS
    # Straight to the training run (no rejection, no tuning): the fitness run itself catches it.
    data = evaluator.data
    fit = fitness_run(
        e, torch.ones(len(e)), evaluator.model, data, cfg.fitness, stage_generator(0, "fitness")
    )
    assert fit == WORST_FITNESS
    cfg2 = EvolveConfig.from_dict(
        {**cfg.to_dict(), "rejection": {"enabled": False}, "tuning": {"enabled": False}}
    )
    res2 = Evaluator(cfg2).evaluate(e.tokens)
    assert res2.status == "nonfinite" and res2.fitness == WORST_FITNESS
    # A good loss in the same setting trains.
    assert Evaluator(cfg2).evaluate(Expression.parse(CE).tokens).fitness < 0.5


def test_cache_by_canonical_string():
    evaluator = Evaluator(tiny_config())
    a = evaluator.evaluate(Expression.parse("square(sub(f, y))").tokens)
    assert evaluator.hits == 0
    b = evaluator.evaluate(Expression.parse("square(sub(f, mul(y, 1)))").tokens)
    assert evaluator.hits == 0 and len(evaluator.cache) == 2
    c = evaluator.evaluate(Expression.parse("add(mul(y, f), mul(f, y))").tokens)
    d = evaluator.evaluate(Expression.parse("add(mul(f, y), mul(y, f))").tokens)
    assert evaluator.hits == 1 and c is d and a is not b


# --- the search --------------------------------------------------------------------------------
def _comparable(state):
    state = json.loads(json.dumps(state))
    for row in state["history"]:
        row.pop("seconds")
    return state


def test_resumed_search_equals_uninterrupted(tmp_path):
    cfg = tiny_config()
    full = EvoMALSearch(cfg, tmp_path / "a", log=None)
    res_full = full.run()
    part = EvoMALSearch(cfg, tmp_path / "b", log=None)
    part.run(stop_after=1)
    assert part.generation == 1
    resumed = EvoMALSearch(cfg, tmp_path / "b", log=None)
    res = resumed.run()
    assert resumed.generation == cfg.search.generations
    assert _comparable(resumed.state_dict()) == _comparable(full.state_dict())
    assert res.best == res_full.best
    # A search run for fewer generations can be extended: same trajectory.
    short = EvolveConfig.from_dict({**cfg.to_dict(), "search": {**cfg.to_dict()["search"]}})
    short.search.generations = 1
    EvoMALSearch(short, tmp_path / "c", log=None).run()
    extended = EvoMALSearch(cfg, tmp_path / "c", log=None)
    extended.run()
    assert extended.state_dict()["population"] == full.state_dict()["population"]
    # A different config cannot silently resume this checkpoint.
    other = EvolveConfig.from_dict({**cfg.to_dict(), "seed": 4})
    with pytest.raises(ValueError, match="different config"):
        EvoMALSearch(other, tmp_path / "b", log=None).run()


def test_cli_search_end_to_end(tmp_path, capsys):
    cfg_file = tmp_path / "evo.yaml"
    d = tiny_config().to_dict()
    d["search"]["initial_expressions"] = [CE]
    import yaml

    cfg_file.write_text(yaml.safe_dump(d))
    parser = argparse.ArgumentParser()
    add_evolve_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        ["evolve", "--config", str(cfg_file), "--out", str(tmp_path / "run"), "--generations", "2"]
    )
    assert args.func is run_evolve
    assert run_evolve(args) == 0
    out = capsys.readouterr().out
    assert "best loss:" in out and "gen 2/2" in out
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["status"] == "ok" and best["fitness"] < 0.5 and "infix_tuned" in best
    loss = load_evolved_loss(tmp_path / "run")
    logits = torch.randn(8, 3, requires_grad=True)
    value = loss(logits, torch.randint(0, 3, (8,)))
    value.backward()
    assert torch.isfinite(value) and logits.grad is not None
    assert len(json.loads((tmp_path / "run" / "hall_of_fame.json").read_text())) >= 1


def test_evolved_loss_save_load(tmp_path):
    m = EvolvedLoss("add(y, sqrt(f))", [1.5, 0.5, 2.0, 1.0])
    m.save(tmp_path / "l.json")
    m2 = load_evolved_loss(tmp_path / "l.json")
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(m(x, t), m2(x, t))
    with pytest.raises(FileNotFoundError, match="npbml evolve"):
        load_evolved_loss(tmp_path / "missing.json")


# --- config and data ---------------------------------------------------------------------------
def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="valid keys.*population"):
        EvolveConfig.from_dict({"search": {"populaton": 3}})
    with pytest.raises(ValueError, match="unknown config key.*valid keys: seed"):
        EvolveConfig.from_dict({"sead": 3})
    with pytest.raises(ValueError, match="parsimony_size"):
        EvolveConfig.from_dict({"search": {"parsimony_size": 3}})
    with pytest.raises(ValueError, match="tuning.meta_lr must be float"):
        EvolveConfig.from_dict({"tuning": {"meta_lr": "fast"}})
    p = tmp_path / "c.yaml"
    p.write_text("tuning:\n  meta_lr: 1e-3\n")
    assert EvolveConfig.from_yaml(p).tuning.meta_lr == 1e-3


def test_repo_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    cfgs = sorted(root.glob("evomal_*.yaml"))
    assert cfgs, "configs/evomal_*.yaml missing"
    ref = None
    for c in cfgs:
        cfg = EvolveConfig.from_yaml(c)
        if c.name == "evomal_reference.yaml":
            ref = cfg
    assert ref is not None
    s = ref.search
    assert (s.population, s.generations, s.crossover_prob, s.mutation_prob) == (25, 50, 0.7, 0.25)
    assert (s.tournament_size, s.parsimony_size, s.max_height) == (4, 1.0, 10)
    assert (ref.tuning.meta_steps, ref.tuning.meta_lr) == (250, 1e-3)


def test_fitness_data_sources():
    d = gaussian_mixture(3, 5, 10, 4, seed=1)
    assert d.x_train.shape == (30, 5) and d.x_val.shape == (12, 5)
    assert torch.equal(d.x_train, gaussian_mixture(3, 5, 10, 4, seed=1).x_train)
    from tasks.dataset import TensorClassDataset

    imgs = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8)
    ds = TensorClassDataset.from_labels(imgs, torch.arange(40) % 5)
    cd = class_dataset_data(ds, num_classes=3, train_per_class=5, val_per_class=3, seed=0)
    assert cd.x_train.shape == (15, 1, 4, 4) and cd.in_dim == 16
    assert set(cd.y_val.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="num_classes"):
        class_dataset_data(ds, num_classes=6, train_per_class=5, val_per_class=3)
    tab = FitnessData.from_arrays(d.x_train.numpy(), d.y_train.numpy(), d.x_val, d.y_val)
    assert tab.num_classes == 3 and tab.in_dim == 5
    with pytest.raises(ValueError, match="labels"):
        FitnessData.from_arrays(d.x_train, d.y_train - 1, d.x_val, d.y_val)
    with pytest.raises(ValueError, match="taskset 'nope'"):
        load_fitness_data(DataConfig(source="taskset", taskset="nope"), 0)


def test_project_cli_wiring(tmp_path, capsys):
    import npbml.cli
    import npbml.evomal.cli  # noqa: F401  (registers `npbml evolve`)

    bad = tmp_path / "bad.yaml"
    bad.write_text("search:\n  populaton: 4\n")
    code = npbml.cli.main(["evolve", "--config", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "populaton" in err and "valid keys" in err and "population" in err
