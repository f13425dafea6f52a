"""Strict configuration of an EvoMAL search (``npbml evolve --config FILE``).

Defaults are CPU-sized so that a search with no config file finishes in a couple of minutes;
``configs/evomal_reference.yaml`` holds the paper's budgets (Raymond et al., TPAMI 2023,
arXiv 2209.08907; docs/methods/evomal.md). Files are checked by the validator every config of the
toolkit shares (:func:`npbml.config.build_dataclass`): unknown keys are errors that list the valid
keys; every config error is a :class:`npbml.config.ConfigError` (a ``ValueError``), reported
without traceback.

The ``data`` and ``model`` sections describe the *fitness* problem (a Gaussian mixture or a task
distribution's images, and an MLP), not an experiment's episodes and backbone, hence their own
names :class:`FitnessDataConfig` and :class:`MLPConfig` (``DataConfig`` and ``ModelConfig`` remain
as aliases for old imports).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from npbml.config import ConfigError, apply_overrides, build_dataclass
from tasks.idx import DATASETS, canonical_name

#: Where fitness data can come from (``data.source``).
DATA_SOURCES = ("gaussian", "taskset", "idx")


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
class FitnessDataConfig:
    """Where fitness data comes from.

    ``source: gaussian`` (default, no files): a seeded Gaussian-mixture classification problem.
    ``source: taskset``: the meta-train split of a registered task distribution
    (``tasks.get_tasksets`` name, e.g. ``omniglot``), split per class into train/validation
    images; ``options`` go to its splits function.
    ``source: idx``: the official *training* split of an IDX dataset (``name``: ``fashion-mnist``,
    ``mnist`` or ``kmnist``; :mod:`tasks.idx`, found under ``root`` or the system paths), classes
    ``0..num_classes-1``, ``train_per_class`` + ``val_per_class`` disjoint seeded images per
    class, pixels standardised with the fitness-training images' mean and std (the protocol of
    ``scripts/fmnist_losses.py``). The test split is never read: the search's fitness is measured
    on a held-out part of the training split (EvoMAL, Raymond et al. TPAMI 2023, sec. 4: fitness
    on validation data).
    """

    source: str = "gaussian"
    num_classes: int = 4
    dim: int = 8
    separation: float = 1.5
    train_per_class: int = 64
    val_per_class: int = 64
    taskset: str | None = None
    #: The IDX dataset of ``source: idx`` (``fashion-mnist``, ``mnist``, ``kmnist``).
    name: str | None = None
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MLPConfig:
    """The base model trained under each candidate: an MLP on flattened inputs."""

    hidden: list[int] = field(default_factory=lambda: [32])


# The names these sections had before they were told apart from the experiment config's.
DataConfig = FitnessDataConfig
ModelConfig = MLPConfig


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
    data: FitnessDataConfig = field(default_factory=FitnessDataConfig)
    model: MLPConfig = field(default_factory=MLPConfig)

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
            (
                self.data.source in DATA_SOURCES,
                f"data.source must be one of {', '.join(DATA_SOURCES)}",
            ),
            (self.data.num_classes >= 2, "data.num_classes must be >= 2"),
            (self.tuning.meta_steps >= 0, "tuning.meta_steps must be >= 0"),
            (self.threads >= 1, "threads must be >= 1"),
            (self.fitness.train_steps >= 1, "fitness.train_steps must be >= 1"),
            (self.data.train_per_class >= 1, "data.train_per_class must be >= 1"),
            (self.data.val_per_class >= 1, "data.val_per_class must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"invalid EvoMAL config: {msg}")
        if self.data.source == "taskset" and not self.data.taskset:
            raise ConfigError("invalid EvoMAL config: data.source=taskset needs data.taskset: NAME")
        if self.data.source == "idx":
            _check_idx(self.data)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict; ``EvolveConfig.from_dict(c.to_dict()) == c``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> EvolveConfig:
        """Build from nested dicts with :func:`npbml.config.build_dataclass`.

        Args:
            d: the mapping read from YAML (``None``: all defaults).

        Returns:
            The validated config.

        Raises:
            ConfigError: an unknown key (the message lists the valid ones), a wrong type or an
                out-of-range value.
        """
        return build_dataclass(cls, d or {})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> EvolveConfig:
        """Read and validate a YAML file (the bare config, or one nested under ``evolve:``).

        Args:
            path: the YAML file.

        Returns:
            The validated config.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ConfigError: the file does not validate; the message starts with ``path``.
        """
        return cls.load(path)

    @classmethod
    def load(
        cls, path: str | os.PathLike | None = None, overrides: Iterable[str] = ()
    ) -> EvolveConfig:
        """Read YAML ``path`` (or start from the defaults), apply ``--set`` overrides, validate.

        The same steps as :func:`npbml.config.load_config` for experiment configs: overrides
        change the raw mapping, so they get the checks a file gets.

        Args:
            path: the YAML file (``None``: the CPU-sized defaults).
            overrides: ``"search.population=8"``-style strings, applied in order.

        Returns:
            The validated config.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ConfigError: the file or an override does not validate; the message starts with
                ``path`` when there is one.
        """
        data = _read(Path(path)) if path is not None else {}
        data = apply_overrides(data, overrides)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            if path is None:
                raise
            raise ConfigError(f"{path}: {exc}") from None


def _check_idx(data: FitnessDataConfig) -> None:
    """``source: idx`` needs a known IDX dataset ``name`` and at most its number of classes.

    Args:
        data: the ``data`` section.

    Raises:
        ConfigError: ``name`` is missing or unknown (the message lists the known names), or
            ``num_classes`` exceeds the dataset's.
    """
    if not data.name:
        raise ConfigError(
            f"invalid EvoMAL config: data.source=idx needs data.name, one of {sorted(DATASETS)}"
        )
    try:
        key = canonical_name(data.name)
    except ValueError as exc:
        raise ConfigError(f"invalid EvoMAL config: data.name: {exc}") from None
    if data.num_classes > DATASETS[key].num_classes:
        raise ConfigError(
            f"invalid EvoMAL config: data.num_classes={data.num_classes} but {key} has "
            f"{DATASETS[key].num_classes} classes"
        )


def _read(p: Path) -> dict[str, Any]:
    """The config mapping in YAML file ``p``: the bare config, or one nested under ``evolve:``."""
    if not p.exists():
        raise FileNotFoundError(f"EvoMAL config {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"EvoMAL config {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of config keys")
    if set(data) == {"evolve"}:
        data = data["evolve"] or {}
    return data
