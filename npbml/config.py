"""Configuration: YAML files validated into nested dataclasses, with one validator for all.

:func:`build_dataclass` checks every key and type of a mapping against a dataclass; it validates
the experiment config (:class:`Config`, ``npbml train``/``eval``/``demo``/``pretrain``), the
supervised-training config (:class:`FitConfig`, ``npbml fit``; :mod:`npbml.fit` re-exports it)
and the EvoMAL search config (:class:`npbml.evomal.config.EvolveConfig`, ``npbml evolve``).

An experiment config file has one mapping per section (``data``, ``model``, ``algorithm``,
``train``, ``eval``); every key is checked against the section's dataclass, so a typo fails
loudly::

    unknown key 'inner_lrr' in section 'algorithm'; valid keys: eval_inner_steps, first_order, ...

Extending it (later issues):

- **A new section** (say ``loss``): write a dataclass whose fields all have defaults and add it as
  a field of :class:`Config` (``loss: LossConfig = field(default_factory=LossConfig)``). The
  validator walks dataclasses generically, so nothing else changes; old files stay valid because
  the section defaults.
- **Algorithm-, model- or dataset-specific settings** go in the section's ``options`` mapping, which
  is passed as keyword arguments to the factory (``build_algorithm(name, model, ..., **options)``).
  ``options`` is free-form by default; a component that wants its options validated has an
  entry in :data:`OPTION_SCHEMAS` (e.g. ``("algorithm", "npbml"): NPBMLOptions``); then unknown
  or mistyped option keys fail like any other key and defaults are filled in.

Command-line overrides ``--set section.key=value`` are applied to the raw mapping *before*
validation (so they get the same checks); ``value`` is parsed with ``yaml.safe_load``
(``3`` -> int, ``0.1`` -> float, ``true`` -> bool, ``[1, 2]`` -> list, ``null`` -> None).
Float fields also accept strings such as ``1e-3``, which YAML 1.1 (PyYAML) reads as a string.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, cast

import yaml

from npbml.algorithms.npbml import NPBMLOptions


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Which task distribution: arguments of :func:`tasks.get_tasksets`.

    ``queries`` query images per class at meta-train time; ``test_queries`` at validation and
    test time (defaults to ``queries``). ``options`` go to the dataset's splits function
    (e.g. ``image_size``, ``rotations``).
    """

    name: str = "glyphs"
    root: str | None = None
    ways: int = 5
    shots: int = 1
    queries: int = 15
    test_queries: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Backbone: ``npbml.models.build_model(name, **kwargs)``.

    ``num_classes`` is the number of ways, and ``in_channels`` / ``image_size`` are read off the
    data, unless ``options`` sets them. ``options`` holds the rest (``hidden``, ``variant``, ...).
    """

    name: str = "conv4"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AlgorithmConfig:
    """Meta-learner: ``npbml.algorithms.build_algorithm(name, model, **kwargs)`` (MAML, Finn et al.
    2017, arXiv 1703.03400; the protocol of docs/methods/protocol.md).

    ``inner_lr`` is alpha, ``inner_steps`` J at meta-train time, ``eval_inner_steps`` J at
    validation/test time (defaults to ``inner_steps``). ``options`` holds algorithm-specific
    keyword arguments (adapt/freeze patterns, ...).
    """

    name: str = "maml"
    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_inner_steps: int | None = None
    first_order: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Outer loop: meta-batch of ``meta_batch_size`` tasks, ``meta_steps`` outer updates.

    ``optimizer`` is Adam (default) or SGD with rate ``meta_lr``; ``lr_schedule`` ``"cosine"``
    decays it to ``min_lr`` over ``meta_steps`` (torch's CosineAnnealingLR). ``grad_clip`` clips
    the global norm of the meta-gradient (``None``: off). Every ``val_every`` steps the mean
    accuracy over ``val_tasks`` fixed validation episodes decides ``best.pt``; ``last.pt`` is
    written every ``checkpoint_every`` steps; train metrics are averaged over ``log_every`` steps.
    ``device``: ``cpu``, ``cuda`` or ``auto``; ``threads``: torch CPU threads during the run
    (``None``: torch's default; 1 is fastest on a machine shared with other jobs).
    ``per_task_backward``: back-propagate each task of a meta-batch as soon as its loss is known
    (``learner.meta_backward``; same gradient, memory of one task instead of B).
    ``task_workers``: run the tasks of a meta-batch on this many CPU threads (> 1 implies
    per-task backward; bit-identical gradient; use with ``threads: 1``, workers x threads <=
    cores; :mod:`npbml.algorithms.task_parallel`).
    ``channels_last``: run the learner's convolutions on NHWC tensors (:mod:`npbml.layout`; same
    values and gradients up to float rounding, 1.07-1.29x faster on CPU for a strided Conv4).
    ``max_nonfinite_steps``: a meta-step whose meta-loss or meta-gradient is not finite is
    skipped with a warning; this many skips in a row stop the run (the last checkpoint is kept).
    """

    meta_batch_size: int = 4
    meta_steps: int = 1000
    meta_lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = 0.0
    lr_schedule: Literal["none", "cosine"] = "none"
    min_lr: float = 0.0
    grad_clip: float | None = None
    val_every: int = 500
    val_tasks: int = 100
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    device: str = "cpu"
    threads: int | None = None
    per_task_backward: bool = False
    task_workers: int = 1
    channels_last: bool = False
    max_nonfinite_steps: int = 5


@dataclass
class EvalConfig:
    """Meta-test: mean accuracy with a 95% interval over ``tasks`` episodes of ``split``."""

    tasks: int = 600
    split: Literal["train", "validation", "test"] = "test"


@dataclass
class Config:
    """A whole experiment. Every section defaults, so a file only lists what it changes."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe); ``config_from_dict(c.to_dict()) == c``."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# ---------------------------------------------------------------------------------------------
# Per-component option schemas
# ---------------------------------------------------------------------------------------------

# (section, component name) -> dataclass validating that section's ``options`` whenever
# ``<section>.name == name``; after validation ``options`` holds every field of the dataclass
# (defaults filled in) as a dict. Other components' options stay free-form. An explicit list: a
# component with validated options adds its entry here.
OPTION_SCHEMAS: dict[tuple[str, str], type] = {
    ("algorithm", "npbml"): NPBMLOptions,
}


def register_options(section: str, name: str, schema: type) -> None:
    """Add an entry to :data:`OPTION_SCHEMAS` at run time (for experiments and tests; the
    toolkit's own components are listed in the mapping itself).

    Args:
        section: the config section (``"algorithm"``, ``"model"``, ``"data"``).
        name: the component's name in that section.
        schema: a dataclass whose fields are the valid options.

    Raises:
        TypeError: ``schema`` is not a dataclass.
    """
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"options schema for {section}/{name} must be a dataclass, got {schema!r}")
    OPTION_SCHEMAS[(section, name)] = schema


def _validate_options(cfg: Config) -> None:
    """Validate each section's ``options`` with its :data:`OPTION_SCHEMAS` entry, if any."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        name, options = getattr(section, "name", None), getattr(section, "options", None)
        schema = OPTION_SCHEMAS.get((f.name, name)) if name is not None else None
        if schema is None or options is None:
            continue
        obj = build_dataclass(schema, options, f"{f.name}.options", f"{f.name}.options ({name})")
        section.options = dataclasses.asdict(obj)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (dict, Mapping):
        return "mapping"
    if origin in (list, tuple):
        return "list"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp`` (with the few safe conversions documented)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return build_dataclass(cast(type, tp), value, key)  # an annotation: a class
        raise _Mismatch
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        args = typing.get_args(tp)
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _Mismatch
        args = typing.get_args(tp)
        et = args[0] if args else Any
        return [_coerce(v, et, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        # bool is an int subclass; ``ways: true`` is a mistake, not 1.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as a string; accept any numeric spelling.
            try:
                out = float(value)
            except ValueError:
                raise _Mismatch from None
            if math.isfinite(out):
                return out
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"config field {key}: unsupported annotation {tp!r}")


def build_dataclass(cls: type, data: Any, section: str = "", label: str | None = None) -> Any:
    """Instantiate dataclass ``cls`` from mapping ``data``, checking every key and type.

    The one validator of experiment, fit and evolve configs (and of registered ``options``
    schemas). Nested dataclass fields are built recursively; ``None`` counts as an empty mapping.

    Args:
        cls: the dataclass to build; its type hints are the schema.
        data: the mapping read from YAML (or ``None``).
        section: dotted path of ``data`` in the whole config (``""`` at the top), used to name
            keys in error messages (``train.meta_lr``).
        label: how the section is named in messages about its keys (default: ``section``).

    Returns:
        An instance of ``cls``; missing keys keep the dataclass defaults.

    Raises:
        ConfigError: ``data`` is not a mapping, holds a key ``cls`` does not have (the message
            lists the valid keys), or a value of the wrong type (the message names the key and
            the expected type).
    """
    label = section if label is None else label
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"section {label!r} must be a mapping of keys to values, got "
            f"{type(data).__name__} {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(key, label, names, hints))
        path = f"{section}.{key}" if section else str(key)
        try:
            kwargs[key] = _coerce(value, hints[key], path)
        except _Mismatch:
            raise ConfigError(
                f"{path} must be {_type_name(hints[key])}, got {type(value).__name__} {value!r}"
            ) from None
    return cls(**kwargs)


def _unknown_key_message(key: Any, label: str, names: list[str], hints: dict[str, Any]) -> str:
    """``unknown key 'x' in section 's'; valid keys: ...``; at the top level, plain keys and
    sections (dataclass-valued keys) are listed apart, as a file shows them."""
    if label:
        return f"unknown key {key!r} in section {label!r}; valid keys: {', '.join(sorted(names))}"
    sections = sorted(n for n in names if dataclasses.is_dataclass(hints[n]))
    plain = sorted(n for n in names if n not in sections)
    if not plain:
        return f"unknown section {key!r}; valid sections: {', '.join(sections)}"
    msg = f"unknown config key {key!r}; valid keys: {', '.join(plain)}"
    return msg + (f"; valid sections: {', '.join(sections)}" if sections else "")


def _check_values(cfg: Config) -> None:
    """Range checks the type system cannot express."""
    positive = {
        "data.ways": cfg.data.ways,
        "data.shots": cfg.data.shots,
        "algorithm.inner_steps": cfg.algorithm.inner_steps,
        "train.meta_batch_size": cfg.train.meta_batch_size,
        "train.meta_steps": cfg.train.meta_steps,
        "train.val_every": cfg.train.val_every,
        "train.val_tasks": cfg.train.val_tasks,
        "train.log_every": cfg.train.log_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "eval.tasks": cfg.eval.tasks,
    }
    if cfg.algorithm.eval_inner_steps is not None:
        positive["algorithm.eval_inner_steps"] = cfg.algorithm.eval_inner_steps
    if cfg.data.test_queries is not None:
        positive["data.test_queries"] = cfg.data.test_queries
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"{key} must be >= 1, got {v}")
    if cfg.data.ways < 2:
        raise ConfigError(
            f"data.ways must be >= 2, got {cfg.data.ways}: an N-way task tells N classes apart "
            "(a 1-way task is solved by always answering its one class)"
        )
    nonneg = {
        "data.queries": cfg.data.queries,
        "algorithm.inner_lr": cfg.algorithm.inner_lr,
        "train.weight_decay": cfg.train.weight_decay,
        "train.min_lr": cfg.train.min_lr,
    }
    for key, x in nonneg.items():
        if x < 0:
            raise ConfigError(f"{key} must be >= 0, got {x}")
    if cfg.train.meta_lr <= 0:
        raise ConfigError(f"train.meta_lr must be > 0, got {cfg.train.meta_lr}")
    if cfg.train.task_workers < 1:
        raise ConfigError(f"train.task_workers must be >= 1, got {cfg.train.task_workers}")
    if cfg.train.threads is not None and cfg.train.threads < 1:
        raise ConfigError(f"train.threads must be >= 1 or null, got {cfg.train.threads}")
    if cfg.train.grad_clip is not None and cfg.train.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip must be > 0 or null, got {cfg.train.grad_clip}")
    from tasks.benchmarks import available_tasksets

    if cfg.data.name not in available_tasksets():
        raise ConfigError(
            f"data.name: unknown task distribution {cfg.data.name!r}; available: "
            f"{', '.join(available_tasksets())}"
        )


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Validate a nested mapping (as read from YAML) into a :class:`Config`."""
    cfg = build_dataclass(Config, data or {})
    _validate_options(cfg)
    _check_values(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Fit configs (``npbml fit``: ordinary supervised training, :mod:`npbml.fit`)
# ---------------------------------------------------------------------------------------------


@dataclass
class FitDataConfig:
    """``kind="omniglot"``: the Omniglot ``splits`` under ``root`` (characters present in several
    splits are kept once), each class split into train / ``val_per_class`` / ``test_per_class``
    images; ``first_classes=K`` keeps only the first ``K`` classes in split order (e.g. 20:
    Balinese characters 1-20 of ``background_small1``), a few-class problem from the same data.
    ``kind="arrays"``: an ``.npz`` at ``path`` with ``x`` and ``y`` (integer ``y`` for
    classification, float for regression) split by ``val_fraction`` / ``test_fraction``.
    ``kind="idx"``: the IDX dataset ``name`` (``fashion-mnist``, ``mnist``, ``kmnist``;
    :mod:`tasks.idx`) from ``root`` or the system install; validation is ``val_fraction`` of the
    official training split, test is the official test split."""

    kind: Literal["omniglot", "arrays", "idx"] = "omniglot"
    name: str | None = None
    root: str | None = None
    splits: list[str] = field(default_factory=lambda: ["background_small1", "background_small2"])
    image_size: int = 28
    val_per_class: int = 3
    test_per_class: int = 3
    first_classes: int | None = None
    path: str | None = None
    task: Literal["classification", "regression"] = "classification"
    val_fraction: float = 0.1
    test_fraction: float = 0.1


@dataclass
class FitModelConfig:
    """``name``: ``conv4``/``resnet12``/``lenet5``/``logistic`` (:func:`npbml.models.build_model`;
    LeNet-5 and the logistic model are the loss-learning papers' models) or ``mlp`` (``hidden``
    widths, ReLU). ``options`` go to the model's constructor."""

    name: str = "conv4"
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitOptimConfig:
    """Base optimizer (``torch.optim.SGD``, ``Adam`` or ``AdamW``; ``momentum`` and ``nesterov``
    are SGD's) and learning-rate schedule (per epoch). AdaLFL looks ahead through whichever
    is chosen (:class:`npbml.inner.TorchOptimStep`)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["constant", "cosine", "step"] = "constant"
    step_size: int = 10
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class FitLossConfig:
    """``name``: ``ce``, ``label_smoothing``, ``sparse_lsr``, ``learned``, ``ml3``, ``adalfl``,
    ``evolved``.

    Learned losses (``learned``, ``ml3``, ``adalfl``): ``hidden``, ``output_activation`` and
    ``init`` (PyTorch's ``"default"``, or ``"kaiming"`` as the AdaLFL reference code) shape the
    loss network; ``inputs`` (``"prob"``, the papers' softmax input, or ``"log_prob"``, this
    toolkit's option against the ``O(1/C)`` gradient scale of the papers' form,
    :class:`~npbml.losses.LearnedLoss`);
    ``ce_warm_start=k > 0`` (also a toolkit option, not in the papers) first regresses the loss
    network onto cross-entropy for ``k`` Adam steps
    (:func:`npbml.loss_learning.warm_start.regress_to_cross_entropy`), so that meta-learning
    starts from a loss that trains the model; ``checkpoint`` optionally loads its
    ``state_dict``. ``offline_steps`` ML3 meta steps (``ml3``: required; ``adalfl``: its
    phase-1 initialisation) run on a copy of the model with the base optimizer unrolled, one
    model continued throughout unless ``reset_every=k``
    (a fresh copy of the initial model every ``k`` steps); ``meta_lr`` is the Adam rate of the
    loss network, ``meta_batch`` what feeds the meta-objective (``"next"`` / another training
    batch, ``"validation"``, or ``"same"``: the batch of the inner step itself, as ML3's
    reference code, facebookresearch/LearningToLearn ``ml3/mnist_task.py``; with many classes
    a class occurs about once per batch, so a different batch gives the one-step objective
    little class-specific signal, see ``docs/results.md``). ``evolved``: ``checkpoint`` is an
    ``npbml evolve`` output
    folder or an ``EvolvedLoss`` JSON file.
    ``guard`` (``ml3``, ``adalfl``; this toolkit's option): train and meta-train through
    :class:`~npbml.loss_learning.GuardedLoss`, whose logit-gradient norm stays within
    ``guard_bounds`` times CE's and whose cosine with CE's gradient is at least
    ``guard_min_cosine``. Unset, each method takes its default: ``adalfl`` is guarded with
    bounds [1, 1] and cosine 0.5 (scale locked to CE's, direction within 60 degrees of it: the
    papers' unbounded form collapses under momentum, docs/losses.md "Why AdaLFL drifted"),
    ``ml3`` is not (the papers' form; bounds [0.25, 4], cosine 0 when ``guard: true``).
    ``guard: false`` gives the papers' form for both.
    ``horizon`` (``adalfl``): ``"step"`` looks one step of the base optimizer ahead (the
    paper's), ``"momentum"`` to where the optimizer's momentum carries the weights
    (:class:`npbml.inner.TorchOptimStep`).
    """

    name: Literal["ce", "label_smoothing", "sparse_lsr", "learned", "ml3", "adalfl", "evolved"] = (
        "ce"
    )
    smoothing: float = 0.1
    hidden: list[int] = field(default_factory=lambda: [50, 50])
    output_activation: Literal["softplus", "none"] = "softplus"
    init: Literal["default", "kaiming"] = "default"
    inputs: Literal["prob", "log_prob"] = "prob"
    ce_warm_start: int = 0
    checkpoint: str | None = None
    meta_lr: float = 1e-3
    meta_batch: Literal["next", "validation", "same"] = "next"
    offline_steps: int = 0
    reset_every: int | None = None
    guard: bool | None = None
    guard_bounds: list[float] | None = None
    guard_min_cosine: float | None = None
    horizon: Literal["step", "momentum"] = "step"


@dataclass
class FitTrainConfig:
    """``epochs`` passes over the training data in batches of ``batch_size``; ``last.pt`` at the
    end of every epoch and, when ``checkpoint_every > 0``, every that many steps; ``threads``:
    torch CPU threads (``None``: torch's default); ``progress``: the progress bar. A step whose
    loss or gradient is not finite is skipped (warned, logged); ``max_nonfinite_steps`` skipped
    steps in a row stop the run with :class:`FloatingPointError`."""

    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    checkpoint_every: int = 0
    progress: bool = True
    max_nonfinite_steps: int = 5


@dataclass
class FitConfig:
    """A whole ``npbml fit`` run: sections ``data``, ``model``, ``optim``, ``loss``, ``train``."""

    data: FitDataConfig = field(default_factory=FitDataConfig)
    model: FitModelConfig = field(default_factory=FitModelConfig)
    optim: FitOptimConfig = field(default_factory=FitOptimConfig)
    loss: FitLossConfig = field(default_factory=FitLossConfig)
    train: FitTrainConfig = field(default_factory=FitTrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_fit_values(cfg: FitConfig) -> None:
    """Range checks of a :class:`FitConfig` that the type system cannot express.

    Raises:
        ConfigError: Naming the key, the value and the valid range.
    """
    t, o, d, lc = cfg.train, cfg.optim, cfg.data, cfg.loss
    at_least_1 = {
        "train.epochs": t.epochs,
        "train.batch_size": t.batch_size,
        "train.max_nonfinite_steps": t.max_nonfinite_steps,
        "optim.step_size": o.step_size,
    }
    if t.threads is not None:
        at_least_1["train.threads"] = t.threads
    for key, v in at_least_1.items():
        if v < 1:
            raise ConfigError(f"{key} must be >= 1, got {v}")
    for key, x in (("optim.lr", o.lr), ("optim.gamma", o.gamma), ("loss.meta_lr", lc.meta_lr)):
        if not x > 0:
            raise ConfigError(f"{key} must be > 0, got {x}: a learning rate (factor) is positive")
    nonneg = {
        "optim.momentum": o.momentum,
        "optim.weight_decay": o.weight_decay,
        "optim.min_lr": o.min_lr,
        "train.checkpoint_every": t.checkpoint_every,
    }
    for key, x in nonneg.items():
        if not x >= 0:
            raise ConfigError(f"{key} must be >= 0, got {x}")
    if not 0 <= lc.smoothing < 1:
        raise ConfigError(f"loss.smoothing must be in [0, 1), got {lc.smoothing}")
    for key, f in (("data.val_fraction", d.val_fraction), ("data.test_fraction", d.test_fraction)):
        if not 0 <= f < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {f}")
    if d.val_fraction + d.test_fraction >= 1:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction must be < 1 (got {d.val_fraction} + "
            f"{d.test_fraction}): the rest are the training rows"
        )


def fit_config_from_dict(data: Mapping[str, Any] | None) -> FitConfig:
    """Validate a nested mapping into a :class:`FitConfig` (unknown keys raise ConfigError)."""
    cfg = build_dataclass(FitConfig, data or {})
    _check_fit_values(cfg)
    cos = cfg.loss.guard_min_cosine
    if cos is not None and not 0.0 <= cos < 1.0:
        raise ConfigError(f"loss.guard_min_cosine must be in [0, 1); got {cos}")
    lo_hi = cfg.loss.guard_bounds
    bad = lo_hi is not None and (len(lo_hi) != 2 or not all(map(math.isfinite, lo_hi)))
    if lo_hi is not None and (bad or not 0 < lo_hi[0] <= lo_hi[1]):
        raise ConfigError(
            f"loss.guard_bounds must be [min_ratio, max_ratio] with 0 < min_ratio <= max_ratio; "
            f"got {lo_hi}"
        )
    if cfg.loss.name == "learned" and cfg.loss.checkpoint is None:
        raise ConfigError(
            "loss.name='learned' trains with a fixed learned loss: set loss.checkpoint to a "
            "LearnedLoss state_dict file (or use loss.name='ml3' / 'adalfl' to learn it)"
        )
    if cfg.loss.name == "evolved" and cfg.loss.checkpoint is None:
        raise ConfigError(
            "loss.name='evolved' needs loss.checkpoint: an `npbml evolve` output folder (its "
            "best.json) or a JSON file written by EvolvedLoss.save"
        )
    if cfg.loss.name == "ml3" and cfg.loss.offline_steps < 1 and cfg.loss.checkpoint is None:
        raise ConfigError(
            "loss.name='ml3' meta-learns the loss offline first: set loss.offline_steps >= 1 "
            "(or load a trained loss network with loss.checkpoint)"
        )
    if cfg.loss.ce_warm_start < 0:
        raise ConfigError(f"loss.ce_warm_start must be >= 0, got {cfg.loss.ce_warm_start}")
    if cfg.loss.ce_warm_start and cfg.loss.checkpoint is not None:
        raise ConfigError(
            "loss.ce_warm_start regresses a fresh loss network onto cross-entropy; it cannot be "
            "combined with loss.checkpoint (set one of them)"
        )
    if cfg.loss.offline_steps < 0:
        raise ConfigError(f"loss.offline_steps must be >= 0, got {cfg.loss.offline_steps}")
    if cfg.loss.reset_every is not None and cfg.loss.reset_every < 1:
        raise ConfigError(f"loss.reset_every must be >= 1 or null, got {cfg.loss.reset_every}")
    if cfg.data.first_classes is not None:
        if cfg.data.first_classes < 2:
            raise ConfigError(
                f"data.first_classes must be >= 2 or null, got {cfg.data.first_classes}"
            )
        if cfg.data.kind != "omniglot":
            raise ConfigError("data.first_classes selects classes of data.kind='omniglot' only")
    if (cfg.data.kind == "idx") != (cfg.data.name is not None):
        raise ConfigError(
            "data.name (an IDX dataset: fashion-mnist, mnist, kmnist) goes with data.kind='idx'; "
            f"got kind={cfg.data.kind!r}, name={cfg.data.name!r}: set both or neither"
        )
    if cfg.data.kind == "arrays" and cfg.data.path is None:
        raise ConfigError("data.kind='arrays' needs data.path (an .npz with arrays x and y)")
    return cfg


# ---------------------------------------------------------------------------------------------
# Overrides and files
# ---------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.meta_lr=3e-4"`` -> ``(["train", "meta_lr"], 3e-4)`` (value via yaml.safe_load)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override key {key!r} has an empty component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each ``key.sub=value`` override set."""
    out = _deepcopy_mapping(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
                )
            node = nxt
        node[parts[-1]] = value
    return out


def _deepcopy_mapping(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deepcopy_mapping(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy_mapping(v) for v in data]
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in YAML file ``path`` (empty file -> ``{}``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; check the path given to --config")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}"
        )
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read YAML ``path`` (or start from defaults when ``None``), apply overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}: {e}") from None


def diff_configs(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y:
            out.append(prefix)

    walk(a.to_dict(), b.to_dict(), "")
    return out
