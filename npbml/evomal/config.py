"""Strict configuration of an EvoMAL search (``npbml evolve --config FILE``).

Defaults are CPU-sized so that a search with no config file finishes in a couple of minutes;
``configs/evomal_reference.yaml`` holds the paper's budgets (Raymond et al., TPAMI 2023,
arXiv 2209.08907; METHODS.md section 6). Unknown keys are errors that list the valid keys; every
config error is a :class:`npbml.config.ConfigError` (a ``ValueError``), reported without traceback.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from npbml.config import ConfigError


@dataclass
class SearchConfig:
    """Genetic-programming budget and operators (paper: 25 x 50, cx 0.7, mut 0.25, tour 4/1)."""

    population: int = 10
    generations: int = 5
    crossover_prob: float = 0.7
    mutation_prob: float = 0.25
    tournament_size: int = 4
    parsimony_size: float = 1.0
    max_height: int = 10
    init_min_height: int = 1
    init_max_height: int = 4
    mutation_max_height: int = 2
    #: Best individuals copied unchanged into the next generation (0 = plain eaSimple).
    elitism: int = 0
    hall_of_fame: int = 5
    #: Expressions (prefix strings, e.g. "mul(-1, mul(y, log(f)))") placed in generation 0.
    initial_expressions: list[str] = field(default_factory=list)


@dataclass
class TuningConfig:
    """ML3-style unrolled tuning of the node scalars (paper: 250 meta-steps, Adam 1e-3)."""

    enabled: bool = True
    meta_steps: int = 25
    meta_lr: float = 1e-2
    inner_lr: float = 0.1
    batch_size: int = 64
    init_std: float = 1e-3


@dataclass
class RejectionConfig:
    """Rejection protocol: optimise free logits under the candidate; its error must drop."""

    enabled: bool = True
    steps: int = 20
    lr: float = 0.1
    num_examples: int = 128


@dataclass
class FitnessConfig:
    """Short training run under the candidate loss; fitness = validation error rate."""

    train_steps: int = 100
    lr: float = 0.1
    momentum: float = 0.0
    batch_size: int = 64


@dataclass
class DataConfig:
    """Where fitness data comes from.

    ``source: gaussian`` (default, no files): a seeded Gaussian-mixture classification problem.
    ``source: taskset``: the meta-train split of a registered task distribution
    (``tasks.get_tasksets`` name, e.g. ``omniglot``), split per class into train/validation
    images; ``options`` go to its splits function.
    """

    source: str = "gaussian"
    num_classes: int = 4
    dim: int = 8
    separation: float = 1.5
    train_per_class: int = 64
    val_per_class: int = 64
    taskset: str | None = None
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The base model trained under each candidate: an MLP on flattened inputs."""

    hidden: list[int] = field(default_factory=lambda: [32])


@dataclass
class EvolveConfig:
    """A whole EvoMAL search."""

    seed: int = 0
    #: torch intra-op threads while evaluating candidates (tiny models: 1 is fastest).
    threads: int = 1
    search: SearchConfig = field(default_factory=SearchConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        s = self.search
        checks = [
            (s.population >= 2, "search.population must be >= 2"),
            (s.generations >= 0, "search.generations must be >= 0"),
            (0 <= s.crossover_prob <= 1, "search.crossover_prob must be in [0, 1]"),
            (0 <= s.mutation_prob <= 1, "search.mutation_prob must be in [0, 1]"),
            (s.tournament_size >= 1, "search.tournament_size must be >= 1"),
            (1 <= s.parsimony_size <= 2, "search.parsimony_size must be in [1, 2] (DEAP)"),
            (s.max_height >= 1, "search.max_height must be >= 1"),
            (
                0 <= s.init_min_height <= s.init_max_height <= s.max_height,
                "need 0 <= search.init_min_height <= search.init_max_height <= search.max_height",
            ),
            (0 <= s.elitism < s.population, "search.elitism must be in [0, population)"),
            (self.data.source in ("gaussian", "taskset"), "data.source: gaussian or taskset"),
            (self.data.num_classes >= 2, "data.num_classes must be >= 2"),
            (self.tuning.meta_steps >= 0, "tuning.meta_steps must be >= 0"),
            (self.threads >= 1, "threads must be >= 1"),
            (self.fitness.train_steps >= 1, "fitness.train_steps must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"invalid EvoMAL config: {msg}")
        if self.data.source == "taskset" and not self.data.taskset:
            raise ConfigError("invalid EvoMAL config: data.source=taskset needs data.taskset: NAME")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> EvolveConfig:
        """Build from nested dicts; unknown keys raise ``ValueError`` listing the valid ones."""
        return _build(cls, d or {}, "")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> EvolveConfig:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"EvoMAL config {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of config keys")
        # Accept either the bare config or one nested under "evolve:".
        if set(data) == {"evolve"}:
            data = data["evolve"]
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{p}: {exc}") from None


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; valid keys"
            f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
        )
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if origin is list and isinstance(value, list):
        return list(value)
    if origin is dict and isinstance(value, dict):
        return dict(value)
    if hint is Any:
        return value
    raise ConfigError(f"config key {name} must be {getattr(hint, '__name__', hint)}, got {value!r}")
