"""The EvoMAL search loop: fitness data, candidate evaluation, GP generations, checkpoints, CLI.

Raymond et al., "Learning Symbolic Model-Agnostic Loss Functions via Meta-Learning", TPAMI 2023
(arXiv 2209.08907), Algorithm 1 (docs/methods/evomal.md). Each new candidate (new canonical
string) is evaluated once, and the result is cached:

1. Rejection protocol. A free logits tensor ``z`` (seeded ``N(0, 1)``, ``[n, C]``, random
   targets) is optimised directly with Adam under the candidate loss (node scalars at their
   initial values) for a few steps. If the classification error of ``argmax z`` against the
   targets does not strictly decrease, the candidate "cannot train" and is rejected. A non-finite
   loss or ``z`` during this test also rejects (status ``nonfinite``).
2. Node-scalar tuning by ML3-style unrolled differentiation (:mod:`npbml.evomal.tuning`).
3. Fitness: the validation error rate of a base model trained from a fixed initialisation for a
   short run of SGD steps under the tuned candidate loss. Any non-finite loss, parameter or
   logit gives the worst fitness (``inf``).

Rejected and non-finite candidates get the worst fitness. Every stage draws its randomness from
torch generators seeded by the search seed only (common random numbers: every candidate sees
the same initial model, batches and rejection problem), so a candidate's fitness is a pure
function of ``(expression, seed, config)``; the GP draws from ``random.Random(seed)``, whose state
is checkpointed after every generation. A resumed search therefore equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from npbml.checkpoint import CheckpointError
from npbml.config import ConfigError
from npbml.evomal.config import (
    DataConfig,
    EvolveConfig,
    FitnessConfig,
    RejectionConfig,
)
from npbml.evomal.expression import EvolvedLoss, Expression
from npbml.evomal.gp import Tokens, random_population, sel_double_tournament, vary
from npbml.evomal.tuning import candidate_loss, init_scalars, make_mlp, sample_batch, tune_scalars
from npbml.run_dir import RunDir, check_resumable
from tasks.errors import TaskDataError
from tasks.idx import load_idx_float

#: Fitness of rejected and non-finite candidates (fitness is an error: lower is better).
WORST_FITNESS = math.inf
CHECKPOINT = "checkpoint.json"
# Config keys a search's trajectory does not depend on: the number of generations (so a finished
# search can be extended), the hall-of-fame size and the thread count.
TRAJECTORY_FREE_KEYS = frozenset({"threads", "search.generations", "search.hall_of_fame"})
_STAGES = {"model": 1, "scalars": 2, "rejection": 3, "tuning": 4, "fitness": 5, "data": 6}


def stage_generator(seed: int, stage: str) -> torch.Generator:
    """A torch generator for one stage of evaluation, a pure function of ``(seed, stage)``."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + _STAGES[stage])


# --- fitness data ------------------------------------------------------------------------------
@dataclass
class FitnessData:
    """Train/validation arrays of a classification problem used for fitness."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int

    @property
    def in_dim(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    @classmethod
    def from_arrays(
        cls, x_train: Any, y_train: Any, x_val: Any, y_val: Any, num_classes: int | None = None
    ) -> FitnessData:
        """Tabular (or any array) data: float inputs ``[N, ...]``, integer labels ``0..C-1``."""
        xt, xv = torch.as_tensor(x_train).float(), torch.as_tensor(x_val).float()
        yt, yv = torch.as_tensor(y_train).long(), torch.as_tensor(y_val).long()
        if len(xt) != len(yt) or len(xv) != len(yv):
            raise ValueError(
                f"inputs and labels differ in length: train {len(xt)} vs {len(yt)}, "
                f"validation {len(xv)} vs {len(yv)}"
            )
        if xt.shape[1:] != xv.shape[1:]:
            raise ValueError(f"train and validation inputs differ in shape: {xt.shape} {xv.shape}")
        c = int(max(yt.max(), yv.max())) + 1 if num_classes is None else int(num_classes)
        if min(yt.min(), yv.min()) < 0 or max(yt.max(), yv.max()) >= c or c < 2:
            raise ValueError(f"labels must be integers in 0..{c - 1} with at least 2 classes")
        return cls(xt, yt, xv, yv, c)


def gaussian_mixture(
    num_classes: int = 4,
    dim: int = 8,
    train_per_class: int = 64,
    val_per_class: int = 64,
    separation: float = 1.5,
    seed: int = 0,
) -> FitnessData:
    """A seeded Gaussian-mixture classification problem (no files needed).

    Class means are ``separation * N(0, I)`` in ``dim`` dimensions; samples are mean + ``N(0, I)``.
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + _STAGES["data"])
    means = separation * torch.randn(num_classes, dim, generator=g)

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(num_classes).repeat_interleave(per_class)
        x = means[y] + torch.randn(len(y), dim, generator=g)
        return x, y

    xt, yt = draw(train_per_class)
    xv, yv = draw(val_per_class)
    return FitnessData(xt, yt, xv, yv, num_classes)


def class_dataset_data(
    dataset: Any, num_classes: int, train_per_class: int, val_per_class: int, seed: int = 0
) -> FitnessData:
    """Fitness data from a :class:`tasks.ClassDataset`: ``num_classes`` seeded classes, each
    split into ``train_per_class`` training and ``val_per_class`` validation images."""
    need = train_per_class + val_per_class
    sizes = dataset.class_sizes()
    eligible = np.flatnonzero(sizes >= need)
    if len(eligible) < num_classes:
        raise ValueError(
            f"the dataset has {len(eligible)} classes with >= {need} images "
            f"(train_per_class + val_per_class) but data.num_classes={num_classes}; "
            f"lower data.num_classes or the per-class counts"
        )
    rng = np.random.default_rng(seed)
    classes = rng.choice(eligible, size=num_classes, replace=False)
    xs_t, xs_v, ys_t, ys_v = [], [], [], []
    for label, c in enumerate(classes):
        idx = rng.permutation(int(sizes[c]))[:need]
        imgs = dataset.images(int(c), idx)
        xs_t.append(imgs[:train_per_class])
        xs_v.append(imgs[train_per_class:])
        ys_t.append(torch.full((train_per_class,), label))
        ys_v.append(torch.full((val_per_class,), label))
    return FitnessData(
        torch.cat(xs_t).float(),
        torch.cat(ys_t),
        torch.cat(xs_v).float(),
        torch.cat(ys_v),
        num_classes,
    )


def idx_data(
    name: str,
    num_classes: int,
    train_per_class: int,
    val_per_class: int,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> FitnessData:
    """Fitness data from the *training* split of an IDX dataset (MNIST, Fashion-MNIST, KMNIST).

    EvoMAL measures fitness on validation data held out of the training set (Raymond et al.,
    TPAMI 2023, sec. 4), so the official test split is never read. Classes ``0..num_classes-1``
    each give ``train_per_class`` training and ``val_per_class`` validation images, disjoint and
    drawn with a seeded permutation; pixels are standardised with the mean and standard deviation
    of the fitness-training images (as ``scripts/fmnist_losses.py`` does with its training part).

    Args:
        name: the IDX dataset (:func:`tasks.idx.canonical_name`: ``fashion-mnist``, ...).
        num_classes: how many classes, from label 0 up.
        train_per_class: fitness-training images per class.
        val_per_class: validation images per class (fitness = error rate on them).
        seed: the draw of the images.
        root: where to look first (torchvision's layout or the four files); ``None``: the
            system paths only.

    Returns:
        Images ``float32 [N, 1, rows, cols]`` (standardised) and labels ``0..num_classes-1``.

    Raises:
        ValueError: a class has fewer than ``train_per_class + val_per_class`` images.
        tasks.errors.TaskDataError: the files are missing or damaged (from :mod:`tasks.idx`).
    """
    images, labels = load_idx_float(name, "train", root)
    need = train_per_class + val_per_class
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in range(num_classes):
        members = np.flatnonzero(labels.numpy() == c)
        if len(members) < need:
            raise ValueError(
                f"{name} class {c} has {len(members)} training images but train_per_class + "
                f"val_per_class = {need}; lower the per-class counts"
            )
        chosen = rng.permutation(members)[:need]
        train_idx.append(chosen[:train_per_class])
        val_idx.append(chosen[train_per_class:])
    it, iv = torch.from_numpy(np.concatenate(train_idx)), torch.from_numpy(np.concatenate(val_idx))
    x_train = images[it]
    mean, std = x_train.mean(), x_train.std().clamp_min(1e-8)
    return FitnessData(
        (x_train - mean) / std, labels[it], (images[iv] - mean) / std, labels[iv], num_classes
    )


def load_fitness_data(cfg: DataConfig, seed: int) -> FitnessData:
    """The fitness data a config asks for (see :class:`~npbml.evomal.config.DataConfig`)."""
    if cfg.source == "gaussian":
        return gaussian_mixture(
            cfg.num_classes, cfg.dim, cfg.train_per_class, cfg.val_per_class, cfg.separation, seed
        )
    if cfg.source == "idx":
        assert cfg.name is not None  # validated: source=idx needs data.name
        try:
            return idx_data(
                cfg.name, cfg.num_classes, cfg.train_per_class, cfg.val_per_class, seed, cfg.root
            )
        except ValueError as exc:
            raise ConfigError(f"data (idx {cfg.name!r}): {exc}") from None
    from tasks.benchmarks import get_tasksets

    assert cfg.taskset is not None  # validated: source=taskset needs data.taskset
    try:
        # Only the meta-train ClassDataset is used; 1-way 1-shot 0-query is the weakest spec.
        train = get_tasksets(
            cfg.taskset, cfg.root, ways=1, shots=1, queries=0, **cfg.options
        ).train.dataset
        return class_dataset_data(
            train, cfg.num_classes, cfg.train_per_class, cfg.val_per_class, seed
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"data (taskset {cfg.taskset!r}): {exc}") from None


# --- candidate evaluation ----------------------------------------------------------------------
@dataclass
class Evaluation:
    """The cached outcome of one candidate (one canonical string)."""

    expression: str  # prefix string of the first tree evaluated with this canonical key
    canonical: str
    status: str  # "ok", "rejected" or "nonfinite"
    fitness: float
    scalars: list[float]
    size: int
    height: int

    def to_loss(self) -> EvolvedLoss:
        return EvolvedLoss(Expression.parse(self.expression), self.scalars)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        expr = Expression.parse(self.expression)
        d["infix"] = expr.to_infix()
        d["infix_tuned"] = expr.to_infix(self.scalars)
        return d


def rejection_test(
    expression: Expression,
    scalars: torch.Tensor,
    num_classes: int,
    cfg: RejectionConfig,
    generator: torch.Generator,
) -> str:
    """EvoMAL's rejection protocol on directly optimised predictions (see module docstring).

    Returns ``"ok"`` when the error of the optimised logits is strictly below their initial
    error, ``"rejected"`` when not, ``"nonfinite"`` when the loss or the logits stop being finite.
    """
    targets = torch.randint(0, num_classes, (cfg.num_examples,), generator=generator)
    z = torch.randn(cfg.num_examples, num_classes, generator=generator).requires_grad_(True)
    w = scalars.detach()

    def error() -> float:
        return (z.detach().argmax(-1) != targets).float().mean().item()

    before = error()
    opt = torch.optim.Adam([z], lr=cfg.lr)
    for _ in range(cfg.steps):
        loss = candidate_loss(expression, w, z, targets)
        if not torch.isfinite(loss):
            return "nonfinite"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert z.grad is not None  # z is the only leaf requiring grad, and backward succeeded
        if not torch.isfinite(z.grad).all():
            return "nonfinite"
        opt.step()
    if not torch.isfinite(z).all():
        return "nonfinite"
    return "ok" if error() < before else "rejected"


def fitness_run(
    expression: Expression,
    scalars: torch.Tensor,
    model: nn.Module,
    data: FitnessData,
    cfg: FitnessConfig,
    generator: torch.Generator,
) -> float:
    """Validation error rate after ``cfg.train_steps`` SGD steps under the candidate loss.

    ``model`` is copied, never trained in place. Non-finite anything gives :data:`WORST_FITNESS`.
    """
    net = copy.deepcopy(model)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    w = scalars.detach()
    for _ in range(cfg.train_steps):
        xb, yb = sample_batch(data.x_train, data.y_train, cfg.batch_size, generator)
        loss = candidate_loss(expression, w, net(xb), yb)
        if not torch.isfinite(loss):
            return WORST_FITNESS
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            return WORST_FITNESS
        logits = net(data.x_val)
        if not torch.isfinite(logits).all():
            return WORST_FITNESS
        return (logits.argmax(-1) != data.y_val).float().mean().item()


class Evaluator:
    """Evaluates candidates (rejection, tuning, fitness) and caches them by canonical string."""

    def __init__(self, cfg: EvolveConfig, data: FitnessData | None = None) -> None:
        self.cfg = cfg
        self.data = data if data is not None else load_fitness_data(cfg.data, cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1_000_003 + _STAGES["model"])
            self.model = make_mlp(
                self.data.in_dim,
                self.data.num_classes,
                list(cfg.model.hidden),
                self.data.x_train.dtype,
            )
        self.cache: dict[str, Evaluation] = {}
        self.hits = 0
        self._keys: dict[Tokens, str] = {}

    def key(self, tokens: Tokens) -> str:
        if tokens not in self._keys:
            self._keys[tokens] = Expression(tokens).canonical()
        return self._keys[tokens]

    def fitness(self, tokens: Tokens) -> float:
        return self.cache[self.key(tokens)].fitness

    def evaluate(self, tokens: Tokens) -> Evaluation:
        """The cached evaluation of ``tokens``, computing it on first sight of its canonical key."""
        k = self.key(tokens)
        if k in self.cache:
            self.hits += 1
            return self.cache[k]
        threads = torch.get_num_threads()
        # The models are tiny: intra-op threads only add synchronisation overhead (measured
        # ~10x slower with 2 threads on a shared 2-core machine).
        torch.set_num_threads(self.cfg.threads)
        try:
            self.cache[k] = ev = self._evaluate(Expression(tokens), k)
        finally:
            torch.set_num_threads(threads)
        return ev

    def _evaluate(self, expr: Expression, key: str) -> Evaluation:
        cfg, seed = self.cfg, self.cfg.seed
        dtype = self.data.x_train.dtype
        w = init_scalars(len(expr), stage_generator(seed, "scalars"), cfg.tuning.init_std, dtype)
        status = "ok"
        if cfg.rejection.enabled:
            # The symbolic candidate (all scalars exactly 1) is tested: with the random init
            # scalars, exact cancellations such as sub(f, f) leave tiny gradients that Adam would
            # amplify into a "trainable" loss.
            status = rejection_test(
                expr,
                torch.ones_like(w),
                self.data.num_classes,
                cfg.rejection,
                stage_generator(seed, "rejection"),
            )
        if status == "ok" and cfg.tuning.enabled and cfg.tuning.meta_steps > 0:
            t = cfg.tuning
            params = dict(self.model.named_parameters())
            w, finite = tune_scalars(
                expr,
                w,
                self.model,
                params,
                self.data.x_train,
                self.data.y_train,
                stage_generator(seed, "tuning"),
                t.meta_steps,
                t.meta_lr,
                t.inner_lr,
                t.batch_size,
            )
            status = "ok" if finite else "nonfinite"
        fit = WORST_FITNESS
        if status == "ok":
            fit = fitness_run(
                expr, w, self.model, self.data, cfg.fitness, stage_generator(seed, "fitness")
            )
            if not math.isfinite(fit):
                status = "nonfinite"
        return Evaluation(
            expr.to_prefix_string(),
            key,
            status,
            float(fit),
            [float(v) for v in w.tolist()],
            len(expr),
            expr.height,
        )


# --- the search --------------------------------------------------------------------------------
def _rank(ev: Evaluation) -> tuple[float, int, str]:
    return (ev.fitness, ev.size, ev.canonical)


@dataclass
class SearchResult:
    """Where a search ended: its best candidate (None when every candidate failed)."""

    best: Evaluation | None
    hall_of_fame: list[Evaluation]
    population: list[Tokens]
    generation: int
    history: list[dict[str, Any]]


class EvoMALSearch:
    """Genetic programming over loss expressions (EvoMAL Algorithm 1), checkpointed per generation.

    ``out_dir`` (optional) receives ``checkpoint.json`` (population, cache, RNG state,
    generation, history; written atomically after every generation), ``best.json`` (readable by
    :func:`~npbml.evomal.expression.load_evolved_loss`) and ``hall_of_fame.json``.
    """

    def __init__(
        self,
        cfg: EvolveConfig,
        out_dir: str | os.PathLike | None = None,
        data: FitnessData | None = None,
        log: Callable[[str], None] | None = print,
    ) -> None:
        self.cfg = cfg
        self.out = Path(out_dir) if out_dir is not None else None
        self.run_dir = (
            RunDir(self.out, last_name=CHECKPOINT, best_name="best.json")
            if self.out is not None
            else None
        )
        self.evaluator = Evaluator(cfg, data)
        self.log = log or (lambda _s: None)
        self.rng = random.Random(cfg.seed)
        self.population: list[Tokens] = []
        self.generation = -1
        self.history: list[dict[str, Any]] = []

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "format": "npbml-evomal-checkpoint-1",
            "config": self.cfg.to_dict(),
            "generation": self.generation,
            "population": [list(t) for t in self.population],
            "cache": {k: asdict(v) for k, v in self.evaluator.cache.items()},
            "rng_state": [version, list(internal), gauss],
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != "npbml-evomal-checkpoint-1":
            raise ConfigError(
                "not an EvoMAL checkpoint (missing format npbml-evomal-checkpoint-1); point --out "
                "at a fresh directory or pass --no-resume"
            )
        check_resumable(
            state["config"],
            self.cfg.to_dict(),
            where="the EvoMAL checkpoint",
            ignore=TRAJECTORY_FREE_KEYS,
        )
        self.generation = int(state["generation"])
        self.population = [tuple(t) for t in state["population"]]
        self.evaluator.cache = {k: Evaluation(**v) for k, v in state["cache"].items()}
        version, internal, gauss = state["rng_state"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.history = list(state["history"])

    def checkpoint_path(self) -> Path | None:
        return self.run_dir.last_path if self.run_dir is not None else None

    def save(self) -> None:
        """Write the checkpoint, best.json and hall_of_fame.json (each atomically)."""
        if self.run_dir is None:
            return
        self.run_dir.save_last(self.state_dict())
        hof = self.hall_of_fame()
        self.run_dir.write_text(
            "hall_of_fame.json", json.dumps([e.describe() for e in hof], indent=2)
        )
        if hof:
            self.run_dir.save_best({**hof[0].describe(), "generation": self.generation})

    # --- results ---------------------------------------------------------------------------
    def hall_of_fame(self, k: int | None = None) -> list[Evaluation]:
        """The ``k`` best distinct (by canonical string) candidates evaluated so far that passed."""
        k = self.cfg.search.hall_of_fame if k is None else k
        ok = [e for e in self.evaluator.cache.values() if e.status == "ok"]
        return sorted(ok, key=_rank)[:k]

    def result(self) -> SearchResult:
        hof = self.hall_of_fame()
        return SearchResult(
            hof[0] if hof else None, hof, list(self.population), self.generation, self.history
        )

    # --- the loop --------------------------------------------------------------------------
    def _evaluate_all(self, pop: list[Tokens]) -> dict[str, int]:
        before, hits0 = len(self.evaluator.cache), self.evaluator.hits
        for t in pop:
            self.evaluator.evaluate(t)
        new = list(self.evaluator.cache.values())[before:]
        return {
            "evaluated": len(new),
            "cache_hits": self.evaluator.hits - hits0,
            "rejected": sum(e.status == "rejected" for e in new),
            "nonfinite": sum(e.status == "nonfinite" for e in new),
        }

    def _record(self, counts: dict[str, int], seconds: float) -> None:
        fits = [self.evaluator.fitness(t) for t in self.population]
        finite = [f for f in fits if math.isfinite(f)]
        hof = self.hall_of_fame(1)
        row = {
            "generation": self.generation,
            "best_in_population": min(fits),
            "mean_finite": sum(finite) / len(finite) if finite else None,
            "best_so_far": hof[0].fitness if hof else None,
            **counts,
            "seconds": round(seconds, 3),
        }
        self.history.append(row)
        best = hof[0].to_loss().expression.to_infix() if hof else "-"
        best_fit = f"{hof[0].fitness:.4f}" if hof else "-"
        mean = f"{row['mean_finite']:.4f}" if finite else "-"
        self.log(
            f"gen {self.generation}/{self.cfg.search.generations}  best {best_fit}  "
            f"pop mean (finite) {mean}  new {counts['evaluated']} (rejected {counts['rejected']}, "
            f"nonfinite {counts['nonfinite']}, cache hits {counts['cache_hits']})  "
            f"{seconds:.1f}s  best loss: {best}"
        )

    def _initialise(self) -> None:
        s = self.cfg.search
        try:
            seeded = [Expression.parse(e).tokens for e in s.initial_expressions][: s.population]
        except ValueError as exc:
            raise ConfigError(f"search.initial_expressions: {exc}") from None
        for t in seeded:
            if "y" not in t or "f" not in t or Expression(t).height > s.max_height:
                raise ConfigError(
                    f"search.initial_expressions: {Expression(t).to_prefix_string()} must read "
                    f"both y and f and have height <= max_height={s.max_height}"
                )
        pop = seeded + random_population(
            self.rng,
            s.population - len(seeded),
            s.init_min_height,
            s.init_max_height,
            s.max_height,
        )
        t0 = time.perf_counter()
        counts = self._evaluate_all(pop)
        self.population, self.generation = pop, 0
        self._record(counts, time.perf_counter() - t0)
        self.save()

    def _step(self) -> None:
        s = self.cfg.search
        ev = self.evaluator
        t0 = time.perf_counter()
        ranked = sorted(self.population, key=lambda t: _rank(ev.cache[ev.key(t)]))
        elites = ranked[: s.elitism]
        parents = sel_double_tournament(
            self.population,
            ev.fitness,
            s.population - s.elitism,
            self.rng,
            s.tournament_size,
            s.parsimony_size,
        )
        offspring = vary(
            parents,
            self.rng,
            s.crossover_prob,
            s.mutation_prob,
            s.max_height,
            s.mutation_max_height,
        )
        counts = self._evaluate_all(offspring)
        self.population = elites + offspring
        self.generation += 1
        self._record(counts, time.perf_counter() - t0)
        self.save()

    def run(self, resume: bool = True, stop_after: int | None = None) -> SearchResult:
        """Run (or resume from ``out_dir``) up to ``search.generations`` generations.

        ``stop_after`` stops after that generation index (to interrupt a search on purpose).
        """
        if resume and self.run_dir is not None and self.run_dir.has_last():
            try:
                state = self.run_dir.load_last()
            except CheckpointError as exc:
                raise ConfigError(str(exc)) from None
            self.load_state_dict(state)
            self.log(f"resumed from {self.run_dir.last_path} at generation {self.generation}")
        if self.generation < 0:
            self._initialise()
        while self.generation < self.cfg.search.generations:
            if stop_after is not None and self.generation >= stop_after:
                break
            self._step()
        res = self.result()
        if res.best is not None:
            expr = Expression.parse(res.best.expression)
            self.log(f"best validation error {res.best.fitness:.4f}")
            self.log(f"best loss:       {expr.to_infix()}")
            self.log(f"with scalars:    {expr.to_infix(res.best.scalars)}")
            self.log(f"canonical:       {res.best.canonical}")
        else:
            self.log("no candidate passed rejection and produced a finite fitness")
        return res


def run_search(
    cfg: EvolveConfig | None = None, out_dir: str | os.PathLike | None = None, **kwargs: Any
) -> SearchResult:
    """Convenience wrapper: ``EvoMALSearch(cfg, out_dir).run(**kwargs)``."""
    return EvoMALSearch(cfg or EvolveConfig(), out_dir).run(**kwargs)


# --- command line ------------------------------------------------------------------------------
def add_evolve_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``npbml evolve`` to an (already created) argument parser."""
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: CPU-sized)")
    p.add_argument("--out", type=Path, required=True, help="output / checkpoint directory")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--generations", type=int, default=None, help="override search.generations")
    p.add_argument("--population", type=int, default=None, help="override search.population")
    p.add_argument(
        "--no-resume", action="store_true", help="ignore an existing checkpoint and start over"
    )


EVOLVE_HELP = "EvoMAL: search for a symbolic loss function (genetic programming + tuning)"


def add_evolve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evolve`` on an argparse sub-parser collection (``npbml evolve ...``).

    The handler is stored as ``func`` (``args.func(args)`` runs :func:`run_evolve`).
    """
    p = subparsers.add_parser(
        "evolve",
        help=EVOLVE_HELP,
        description="EvoMAL symbolic loss search (Raymond et al., TPAMI 2023). Resumes from "
        "OUT/checkpoint.json when present; the best loss goes to OUT/best.json.",
    )
    add_evolve_arguments(p)
    p.set_defaults(func=run_evolve)
    return p


def run_evolve(args: argparse.Namespace) -> int:
    """Entry point of ``npbml evolve``: build the config, run or resume, print the best loss."""
    try:
        cfg = EvolveConfig.from_yaml(args.config) if args.config else EvolveConfig()
        d = cfg.to_dict()
        if getattr(args, "seed", None) is not None:
            d["seed"] = args.seed
        for name in ("generations", "population"):
            if getattr(args, name, None) is not None:
                d["search"][name] = getattr(args, name)
        cfg = EvolveConfig.from_dict(d)
        search = EvoMALSearch(cfg, args.out)
        res = search.run(resume=not getattr(args, "no_resume", False))
    except (ConfigError, FileNotFoundError, TaskDataError) as exc:
        print(f"npbml: error: {exc}", file=sys.stderr)
        return 2
    if res.best is None:
        return 1
    print(f"saved {Path(args.out) / 'best.json'} (load with npbml.evomal.load_evolved_loss)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m npbml.evomal.search --out DIR``: the same options as ``npbml evolve``."""
    parser = argparse.ArgumentParser(prog="npbml")
    add_evolve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evolve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
