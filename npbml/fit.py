"""Ordinary (non-episodic) supervised training, with any loss of :mod:`npbml.losses` or AdaLFL.

``fit(config, out_dir)`` trains a model on a class-split image dataset (e.g. every character of
the Omniglot minimal splits, each split per class into train / validation / test images) or on
tabular / regression arrays, with a tqdm progress bar, atomic checkpoints (``last.pt``,
``best.pt``), exact resume and ``metrics.jsonl`` (one JSON record per evaluation).

Losses: ``ce``, ``label_smoothing``, ``sparse_lsr`` (Raymond et al., EvoMAL, arXiv 2209.08907;
docs/methods/sparse-lsr.md), ``learned`` (a fixed loss network, e.g. meta-learned by ML3, loaded
from ``loss.checkpoint``), ``ml3`` (the loss network is first meta-learned offline by ML3 on the
training data for ``loss.offline_steps`` steps, Bechtle et al. arXiv 1906.05374, then frozen to
train the model), ``adalfl`` (online loss learning, Raymond et al. arXiv 2301.13247;
docs/methods/learned-losses.md) and ``evolved`` (a symbolic EvoMAL loss loaded from
``loss.checkpoint``: an ``npbml evolve`` output folder or a saved ``EvolvedLoss`` JSON; Raymond
et al. arXiv 2209.08907, docs/methods/evomal.md). The data formats, the run directory and the
metrics records are described in docs/fit.md (the arrays format also in docs/data-formats.md).

Exact resume: the batch order of epoch ``e`` is a pure function of ``(seed, e)`` and the model,
optimizer, schedule, loss-learning and RNG states are checkpointed, so a run killed and resumed
produces the same weights as an uninterrupted one.

Config: a YAML/dict with sections ``data``, ``model``, ``optim``, ``loss``, ``train``; unknown
keys are errors (validated with the strict dataclass builder of :mod:`npbml.config`).
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from npbml.checkpoint import load_checkpoint, rng_state, set_rng_state
from npbml.config import (  # the fit schema lives with the other configs; re-exported here
    ConfigError,
    FitConfig,
    FitDataConfig,
    FitLossConfig,
    FitModelConfig,
    FitOptimConfig,
    FitTrainConfig,  # noqa: F401  (re-exported: ``from npbml.fit import FitTrainConfig``)
    fit_config_from_dict,
)
from npbml.inner import InnerSGD
from npbml.loss_learning.adalfl import DEFAULT_GUARD, AdaLFL
from npbml.loss_learning.ml3 import ML3, GuardedLoss
from npbml.loss_learning.warm_start import regress_to_cross_entropy
from npbml.losses import LearnedLoss, all_finite, build_loss
from npbml.run_dir import RunDir


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
@dataclass
class FitData:
    """Train / validation / test tensors. ``num_outputs`` is the class count (classification) or
    the target dimension (regression)."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    task: str
    num_outputs: int


def split_class_dataset(
    dataset: Any, val_per_class: int, test_per_class: int, seed: int
) -> FitData:
    """Split every class of a :class:`tasks.ClassDataset` into train / val / test images.

    The images of class ``c`` are permuted with a generator seeded by ``(seed, c)``; the first
    ``val_per_class`` go to validation, the next ``test_per_class`` to test, the rest to train.
    """
    parts: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {
        k: ([], []) for k in ("train", "val", "test")
    }
    for c in range(dataset.num_classes):
        n = dataset.num_images(c)
        if n < val_per_class + test_per_class + 1:
            raise ConfigError(
                f"class {c} has {n} images: too few for {val_per_class} validation + "
                f"{test_per_class} test + 1 training image; lower data.val_per_class/test_per_class"
            )
        order = np.random.default_rng([seed, c]).permutation(n)
        cuts = {
            "val": order[:val_per_class],
            "test": order[val_per_class : val_per_class + test_per_class],
            "train": order[val_per_class + test_per_class :],
        }
        for k, idx in cuts.items():
            if len(idx):
                parts[k][0].append(dataset.images(c, np.sort(idx)))
                parts[k][1].append(torch.full((len(idx),), c, dtype=torch.long))

    def cat(k: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = parts[k]
        if not xs:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.cat(xs), torch.cat(ys)

    return FitData(cat("train"), cat("val"), cat("test"), "classification", dataset.num_classes)


def _omniglot(cfg: FitDataConfig) -> Any:
    from tasks.dataset import ConcatClasses, SubsetClasses
    from tasks.omniglot import Omniglot

    seen: set[str] = set()
    parts = []
    for split in cfg.splits:
        ds = Omniglot(cfg.root, split, image_size=cfg.image_size)
        keep = [c for c in range(ds.num_classes) if ds.class_name(c) not in seen]
        seen.update(ds.class_name(c) for c in keep)  # Greek and Latin are in both minimal splits
        parts.append(SubsetClasses(ds, keep) if len(keep) < ds.num_classes else ds)
    return parts[0] if len(parts) == 1 else ConcatClasses(parts)


def _check_features(x: np.ndarray, where: str) -> np.ndarray:
    """``x`` as float32 rows, refused when it is empty, not numeric or not finite.

    Raises:
        ConfigError: Naming the problem (first bad row included) and the fix.
    """
    if x.ndim < 1 or len(x) == 0:
        raise ConfigError(f"{where} x has no rows (shape {x.shape}); give at least one sample")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ConfigError(
            f"{where} x has dtype {x.dtype}, not numbers: convert the features to floats "
            "(e.g. one-hot encode string columns) before saving the .npz"
        )
    x = x.astype(np.float32)
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ConfigError(
            f"{where} x has non-finite values (NaN or inf) in {len(rows)} of {len(x)} rows "
            f"(first: row {rows[0]}): clean or impute them, or drop those rows with "
            "keep = np.isfinite(x.reshape(len(x), -1)).all(1); x, y = x[keep], y[keep]"
        )
    return x


_RELABEL = "relabel with np.unique(y, return_inverse=True)[1]"


def _class_labels(y: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    """Classification targets as int64 labels ``0..C-1`` (every class present), and ``C``.

    Raises:
        ConfigError: Strings, fractional floats, a shape other than ``(N,)``, labels that are
            not exactly ``0..C-1``, or fewer than 2 classes; the message names the values found
            and the fix.
    """
    if y.ndim != 1:
        raise ConfigError(
            f"{where} y has shape {y.shape}; classification labels are one integer per row, "
            "shape (N,): flatten it (y.ravel()) or use data.task=regression"
        )
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        raise ConfigError(
            f"{where} labels are {y.dtype} (e.g. strings), not integers 0..C-1: {_RELABEL} "
            "(keep the first array as the class names)"
        )
    fractional = np.issubdtype(y.dtype, np.floating) and not (
        np.isfinite(y).all() and (y == np.round(y)).all()
    )
    if fractional:
        example = y[~(y == np.round(y))][0]
        raise ConfigError(
            f"{where} labels are floats that are not integers (e.g. {example}): classification "
            f"needs integer labels 0..C-1 ({_RELABEL}); for real-valued targets set "
            "data.task=regression"
        )
    labels = y.astype(np.int64)
    values = np.unique(labels)
    c = len(values)
    found = f"found {c} distinct value{'s' if c != 1 else ''} " + (
        f"{values[0]}..{values[-1]}" if c > 1 else f"{values[0]}"
    )
    if c < 2:
        raise ConfigError(
            f"{where} labels: {found}; classification needs at least 2 classes, labelled by "
            "integers 0..C-1: add samples of other classes (or use data.task=regression)"
        )
    if values[0] != 0 or values[-1] != c - 1:
        raise ConfigError(f"{where} labels must be integers 0..C-1; {found} (C={c}): {_RELABEL}")
    return labels, c


def split_arrays(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    task: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    where: str = "data.path",
) -> FitData:
    """Random train / val / test split of tabular arrays, after checking them.

    Args:
        x: Features, one row per sample (any shape ``(N, ...)``), numeric and finite.
        y: Targets: integer class labels ``0..C-1`` of shape ``(N,)`` (classification; every
            class present, ``C >= 2``), or real values ``(N,)`` / ``(N, D)`` (regression).
        task: ``"classification"`` or ``"regression"``.
        val_fraction: Share of the rows for validation (rounded to whole rows).
        test_fraction: Share of the rows for test.
        seed: Seeds the one random permutation of the rows that makes the split.
        where: Names the source in error messages (e.g. the ``.npz`` path).

    Returns:
        The split data.

    Raises:
        ConfigError: Bad arrays (see :func:`_check_features`, :func:`_class_labels`), a row
            count mismatch, or fractions that leave no training rows.
    """
    xa = _check_features(np.asarray(x), where)
    ya = np.asarray(y)
    if ya.ndim < 1 or len(xa) != len(ya):
        raise ConfigError(
            f"{where} x has {len(xa)} rows but y has {len(ya) if ya.ndim else 0}: give one "
            "target per row of x"
        )
    if task == "classification":
        labels, num_outputs = _class_labels(ya, where)
        yt = torch.from_numpy(labels)
    else:
        if not np.issubdtype(ya.dtype, np.number) or not np.isfinite(ya).all():
            raise ConfigError(
                f"{where} regression targets y must be finite numbers (got dtype {ya.dtype}"
                f"{'' if not np.issubdtype(ya.dtype, np.number) else ' with NaN or inf'}): "
                "clean or drop those rows"
            )
        yt = torch.from_numpy(ya.astype(np.float32))
        yt = yt.unsqueeze(1) if yt.dim() == 1 else yt
        num_outputs = yt.shape[1]
    xt = torch.from_numpy(xa)
    n = len(xt)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    n_val, n_test = int(round(val_fraction * n)), int(round(test_fraction * n))
    if n - n_val - n_test < 1:
        raise ConfigError(
            f"data.val_fraction={val_fraction} + data.test_fraction={test_fraction} of {n} rows "
            "leave no training rows: lower them or add rows"
        )
    iv, it, itr = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    return FitData((xt[itr], yt[itr]), (xt[iv], yt[iv]), (xt[it], yt[it]), task, num_outputs)


def _idx_data(d: FitDataConfig, seed: int) -> FitData:
    """An IDX dataset (:mod:`tasks.idx`): validation carved from the official training split
    (``val_fraction``, seeded), test = the official test split, images scaled to ``[0, 1]``."""
    from tasks.idx import DATASETS, canonical_name, load_idx_float

    assert d.name is not None  # validated with kind="idx"
    try:
        key = canonical_name(d.name)
    except ValueError as e:
        raise ConfigError(f"data.name: {e}") from e
    x, y = load_idx_float(key, "train", d.root)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    n_val = int(round(d.val_fraction * len(x)))
    iv, itr = order[:n_val], order[n_val:]
    test = load_idx_float(key, "test", d.root)
    return FitData(
        (x[itr], y[itr]), (x[iv], y[iv]), test, "classification", DATASETS[key].num_classes
    )


def build_fit_data(cfg: FitConfig) -> FitData:
    """The datasets named by ``cfg.data``."""
    d = cfg.data
    if d.kind == "omniglot":
        dataset = _omniglot(d)
        if d.first_classes is not None:
            from tasks.dataset import SubsetClasses

            if d.first_classes > dataset.num_classes:
                raise ConfigError(
                    f"data.first_classes={d.first_classes} but the splits {d.splits} hold only "
                    f"{dataset.num_classes} classes; lower it or add splits"
                )
            dataset = SubsetClasses(dataset, list(range(d.first_classes)))
        return split_class_dataset(dataset, d.val_per_class, d.test_per_class, cfg.train.seed)
    if d.kind == "idx":
        return _idx_data(d, cfg.train.seed)
    assert d.path is not None  # kind="arrays" (validated: it needs data.path)
    x, y = load_arrays(d.path)
    where = f"data.path {d.path}:"
    return split_arrays(x, y, d.task, d.val_fraction, d.test_fraction, cfg.train.seed, where)


def load_arrays(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of an ``.npz`` file (``np.savez(path, x=..., y=...)``).

    Raises:
        FileNotFoundError: There is no such file.
        ConfigError: The file is not an ``.npz`` of plain arrays, or lacks ``x`` or ``y``.
    """
    try:
        arrays = np.load(path)
        if not isinstance(arrays, Mapping):  # an .npy file holds one bare array
            raise ConfigError(
                f"data.path {path} holds one array, not an .npz with x and y; save with "
                "np.savez(path, x=features, y=targets)"
            )
        missing = [k for k in ("x", "y") if k not in arrays]
        if missing:
            raise ConfigError(
                f"data.path {path}: missing array {missing[0]!r} (it has {sorted(arrays)}); "
                "save with np.savez(path, x=features, y=targets)"
            )
        return arrays["x"], arrays["y"]
    except ConfigError:
        raise
    except (ValueError, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        detail = (str(e).splitlines() or [""])[0]
        raise ConfigError(
            f"data.path {path} is not an .npz of plain arrays ({type(e).__name__}: {detail}); "
            "save with np.savez(path, x=features, y=targets)"
        ) from None


# ---------------------------------------------------------------------------------------------
# Model, optimizer, loss
# ---------------------------------------------------------------------------------------------
def build_fit_model(cfg: FitModelConfig, data: FitData) -> nn.Module:
    x = data.train[0]
    if cfg.name == "mlp":
        widths = [int(np.prod(x.shape[1:])), *cfg.hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], data.num_outputs))
        return nn.Sequential(*layers)
    from npbml.models import build_model

    options = {"num_classes": data.num_outputs, **cfg.options}
    name = cfg.name.lower()
    if name in ("conv4", "lenet5"):
        if x.dim() != 4:
            raise ConfigError(
                f"model.name={cfg.name!r} needs images [N, C, H, W]; the data has shape "
                f"{tuple(x.shape)}: use model.name='mlp' or 'logistic' for flat features"
            )
        options.setdefault("in_channels", x.shape[1])
        options.setdefault("image_size", x.shape[-1])
    elif name == "logistic":
        options.setdefault("in_features", int(np.prod(x.shape[1:])))
    return build_model(cfg.name, **options)


def _offline_pairs(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    seed: int,
    meta_batch: str,
    device: torch.device,
):
    """Endless ``(train_batch, meta_batch)`` pairs for the offline (ML3) phase, a pure function
    of ``seed``: the meta batch is another random training batch, a validation batch, or the
    training batch itself (``"same"``)."""
    (x, y), (vx, vy) = train, val
    g = np.random.default_rng([seed, 99])
    while True:
        i = g.integers(0, len(x), batch_size)
        if meta_batch == "same":
            mb = (x[i].to(device), y[i].to(device))
        elif meta_batch == "validation":
            j = g.integers(0, len(vx), batch_size)
            mb = (vx[j].to(device), vy[j].to(device))
        else:
            j = g.integers(0, len(x), batch_size)
            mb = (x[j].to(device), y[j].to(device))
        yield (x[i].to(device), y[i].to(device)), mb


def _task_loss(task: str):
    if task == "classification":
        return F.cross_entropy
    return lambda p, y: F.mse_loss(p, y.reshape(p.shape))


def _lr_at(cfg: FitOptimConfig, epoch: int, epochs: int) -> float:
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * epoch / epochs))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** (epoch // cfg.step_size)
    return cfg.lr


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, batch_size: int = 512
) -> dict[str, float]:
    """Mean task loss (CE or MSE) and, for classification, accuracy, in eval mode."""
    if len(x) == 0:
        return {}
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        out = model(xb)
        total += _task_loss(task)(out, yb).item() * len(xb)
        if task == "classification":
            correct += int((out.argmax(-1) == yb).sum())
    model.train(was)
    result = {"loss": total / len(x)}
    if task == "classification":
        result["acc"] = correct / len(x)
    return result


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng([seed, epoch, 7]).permutation(n))


class _TrainBatches:
    """The training batch of global step ``k``: rows ``pos*B .. (pos+1)*B`` of epoch ``e``'s
    order, ``(e, pos) = divmod(k, steps_per_epoch)``, a pure function of ``(seed, e)``, so a
    resumed run draws the same batches."""

    def __init__(
        self, train: tuple[torch.Tensor, torch.Tensor], batch_size: int, seed: int, device: Any
    ) -> None:
        self.x, self.y = train
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.steps_per_epoch = math.ceil(len(self.x) / batch_size)
        self._orders: dict[int, torch.Tensor] = {}

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            # The current epoch's order and the next one's ("next" meta batches) suffice.
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = _epoch_order(self.seed, epoch, len(self.x))
        idx = self._orders[epoch][pos * self.batch_size : (pos + 1) * self.batch_size]
        return self.x[idx].to(self.device), self.y[idx].to(self.device)


# The loss module each loss kind trains with: ML3 and AdaLFL learn a LearnedLoss network, and
# "ce" stands for the task's standard loss (cross-entropy, or mean squared error for regression).
_LOSS_MODULE = {"ml3": "learned", "adalfl": "learned"}
_TASK_LOSS = {"classification": "ce", "regression": "mean_squared_error"}
# The FitLossConfig fields each loss module is built from.
_LOSS_OPTIONS: dict[str, tuple[str, ...]] = {
    "label_smoothing": ("smoothing",),
    "sparse_lsr": ("smoothing",),
    "learned": ("hidden", "output_activation", "init", "inputs", "checkpoint"),
    "evolved": ("checkpoint",),
}


def build_fit_loss(lc: FitLossConfig, task: str, seed: int, device: torch.device) -> nn.Module:
    """The loss module of config section ``loss``: one :func:`npbml.losses.build_loss` call.

    Args:
        lc: The ``loss`` section.
        task: ``"classification"`` or ``"regression"`` (``data.task``).
        seed: The run's seed (the cross-entropy warm start of a loss network draws from it).
        device: Where the loss module goes.

    Returns:
        The loss module; a loss network is warm-started when ``loss.ce_warm_start`` asks.

    Raises:
        ConfigError: A loss that does not fit the task or its options.
    """
    name = _LOSS_MODULE.get(lc.name, lc.name)
    name = _TASK_LOSS[task] if name == "ce" else name
    options = {k: getattr(lc, k) for k in _LOSS_OPTIONS.get(name, ())}
    try:
        loss_fn = build_loss(name, task=task, **options).to(device)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"loss.name={lc.name!r} (data.task={task!r}): {e}") from e
    if lc.ce_warm_start and isinstance(loss_fn, LearnedLoss):
        if task != "classification":
            raise ConfigError("loss.ce_warm_start is for classification (data.task)")
        regress_to_cross_entropy(loss_fn, steps=lc.ce_warm_start, seed=seed)
    return loss_fn


class OptimizerUpdater:
    """Plain training: a fixed loss, its gradient through a torch optimizer (SGD or Adam).

    Args:
        loss_fn: The loss (frozen here: only the model is trained).
        optimizer: The optimizer over the model's parameters.
    """

    #: Whether the loss network is meta-learned before step 0 (``loss.offline_steps``).
    learns_loss = False

    def __init__(self, loss_fn: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.loss_fn = loss_fn.requires_grad_(False)
        self.optimizer = optimizer

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of this step (the per-epoch schedule)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int
    ) -> tuple[float, dict[str, float]]:
        """One update of ``model`` on ``batch``.

        Args:
            model: The model being trained.
            batch: ``(inputs, targets)`` on the model's device.
            step: The global step index (unused by a plain optimizer).

        Returns:
            The batch loss before the update and the extra progress-bar values: none, or
            ``{"skipped": 1}`` when the loss or a gradient was not finite and the update was
            dropped (the model and optimizer state are then unchanged).
        """
        loss = self.loss_fn(model(batch[0]), batch[1])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not all_finite(loss.detach(), *grads):
            self.optimizer.zero_grad(set_to_none=True)
            return loss.item(), {"skipped": 1}
        self.optimizer.step()
        return loss.item(), {}

    def on_epoch_end(self, run: RunDir, step: int) -> dict[str, Any]:
        """Extra fields of the epoch's metrics record (none)."""
        return {}

    def on_offline_done(self, run: RunDir) -> None:
        """Called once the offline phase (if any) has learned the loss."""

    def on_finish(self, run: RunDir) -> None:
        """Called when the last step is done."""

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, under the checkpoint key ``"optimizer"``."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from a checkpoint written with :meth:`state_dict` (and a loss network saved
        there, ``"loss_net"``)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if "loss_net" in state:
            self.loss_fn.load_state_dict(state["loss_net"])


class ML3Updater(OptimizerUpdater):
    """ML3 (Bechtle et al. 2020): the loss network is meta-learned offline before step 0 (see
    :func:`_ml3_offline`), then frozen while a plain optimizer trains the model.

    Args:
        loss_fn: The loss network.
        optimizer: The optimizer over the model's parameters.
        offline: ``offline(pairs, steps, reset_every) -> meta-loss history`` (the ML3 phase).
    """

    learns_loss = True

    def __init__(self, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, offline: Any) -> None:
        super().__init__(loss_fn, optimizer)
        self.offline_init = offline

    def on_offline_done(self, run: RunDir) -> None:
        torch.save(self.loss_fn.state_dict(), run.path / "loss_net.pt")

    def state_dict(self) -> dict[str, Any]:
        # The loss learned before step 0 cannot be recomputed on resume: it is checkpointed.
        return {**super().state_dict(), "loss_net": self.loss_fn.state_dict()}


class AdaLFLUpdater:
    """AdaLFL (Raymond et al. 2023): the loss network is learned online, one unrolled
    meta-step per model step (:class:`npbml.loss_learning.adalfl.AdaLFL`).

    Args:
        adalfl: The online loss learner (it holds the model and the loss network).
        meta_batch: ``meta_batch(step, batch)``: the batch of the meta-objective at ``step``.
    """

    learns_loss = True

    #: Per-step diagnostics averaged into each epoch's train record (AdaLFLStep fields).
    DIAGNOSTICS = ("learned_loss", "meta_loss", "grad_ratio", "grad_cosine")

    def __init__(self, adalfl: AdaLFL, meta_batch: Any) -> None:
        self.adalfl, self.meta_batch = adalfl, meta_batch
        self.loss_fn = adalfl.loss_net
        # Sums of the epoch so far (checkpointed, so a resumed epoch logs the same means).
        self.sums: dict[str, float] = dict.fromkeys(self.DIAGNOSTICS, 0.0)
        self.count = 0

    def set_lr(self, lr: float) -> None:
        self.adalfl.set_base_lr(lr)

    def step(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int
    ) -> tuple[float, dict[str, float]]:
        """One model step under the current loss, then one meta-step of the loss.

        Args:
            model: The model being trained (the one the learner holds).
            batch: ``(inputs, targets)`` of the model step.
            step: The global step index (chooses the meta batch).

        Returns:
            The batch's cross-entropy before the update (the learned loss's value for
            regression), and the learned loss's value, the meta-loss and the skip flag for the
            progress bar.
        """
        if model is not self.adalfl.model:
            raise ValueError("AdaLFLUpdater.step: model is not the model AdaLFL was built with")
        base, meta = self.adalfl.step(batch, self.meta_batch(step, batch))
        info = self.adalfl.last_step
        if not info.skipped:
            values = (base, meta, info.grad_ratio, info.grad_cosine)
            for key, value in zip(self.DIAGNOSTICS, values):
                self.sums[key] += value
            self.count += 1
        # The learned loss's value has an arbitrary scale: cross-entropy is what a user reads.
        shown = info.ce if math.isfinite(info.ce) or info.skipped else base
        return shown, {"learned_loss": base, "meta_loss": meta, "skipped": int(info.skipped)}

    def offline_init(self, pairs: Any, steps: int, reset_every: int | None) -> list[float]:
        """Phase 1: ML3-style offline initialisation of the loss network."""
        return self.adalfl.offline_init(pairs, steps, reset_every)

    def on_epoch_end(self, run: RunDir, step: int) -> dict[str, Any]:
        # Snapshots of phi for plots of the loss over the run (npbml.plots).
        snap_dir = run.path / "loss_snapshots"
        snap_dir.mkdir(exist_ok=True)
        torch.save(self.adalfl.loss_net.state_dict(), snap_dir / f"step{step:08d}.pt")
        means = {k: v / self.count for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = dict.fromkeys(self.DIAGNOSTICS, 0.0), 0
        # NaN (regression has no CE to compare with) is left out: metrics.jsonl is strict JSON.
        finite = {k: v for k, v in means.items() if math.isfinite(v)}
        return {"skipped_steps": self.adalfl.skipped_steps, **finite}

    def on_offline_done(self, run: RunDir) -> None:
        """The loss network is saved at the end of the run (it keeps learning)."""

    def on_finish(self, run: RunDir) -> None:
        torch.save(self.adalfl.loss_net.state_dict(), run.path / "loss_net.pt")

    def state_dict(self) -> dict[str, Any]:
        """The learner's state, under the checkpoint key ``"adalfl"``."""
        sums = {"sums": dict(self.sums), "count": self.count}
        return {"adalfl": self.adalfl.state_dict(), "adalfl_epoch": sums}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.adalfl.load_state_dict(state["adalfl"])
        epoch = state.get("adalfl_epoch", {"sums": {}, "count": 0})
        self.sums = {k: float(epoch["sums"].get(k, 0.0)) for k in self.DIAGNOSTICS}
        self.count = int(epoch["count"])


Updater = OptimizerUpdater | AdaLFLUpdater


def _guard(loss_fn: nn.Module, lc: FitLossConfig) -> GuardedLoss | None:
    """``loss.guard``: the learned loss inside :class:`GuardedLoss` with ``loss.guard_bounds``
    and ``loss.guard_min_cosine``; unset, AdaLFL's default (:data:`DEFAULT_GUARD`) or ML3's
    (none; GuardedLoss's own bounds when guarded)."""
    adalfl = lc.name == "adalfl"
    if not (lc.guard if lc.guard is not None else adalfl):
        return None
    defaults = DEFAULT_GUARD if adalfl else {"min_ratio": 0.25, "max_ratio": 4.0, "min_cosine": 0.0}
    low, high = lc.guard_bounds or (defaults["min_ratio"], defaults["max_ratio"])
    cos = defaults["min_cosine"] if lc.guard_min_cosine is None else lc.guard_min_cosine
    return GuardedLoss(loss_fn, low, high, min_cosine=cos)


def _make_optimizer(oc: FitOptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    if oc.name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=oc.lr,
            momentum=oc.momentum,
            nesterov=oc.nesterov and oc.momentum > 0,
            weight_decay=oc.weight_decay,
        )
    adam = torch.optim.AdamW if oc.name == "adamw" else torch.optim.Adam
    return adam(model.parameters(), lr=oc.lr, weight_decay=oc.weight_decay)


def _adalfl_meta_batches(cfg: FitConfig, data: FitData, batches: _TrainBatches) -> Any:
    """``meta_batch(step, batch)`` for ``loss.meta_batch``: the next training batch (the first
    of the next epoch after an epoch's last), the batch itself, or a validation batch."""
    vx, vy = data.val
    if cfg.loss.meta_batch == "validation" and len(vx) == 0:
        raise ConfigError("loss.meta_batch='validation' needs validation data")
    val = _ValidationBatches(len(vx), cfg.train.batch_size, cfg.train.seed)
    device = batches.device

    def validation(step: int, _batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        vi = val.indices(step)
        return vx[vi].to(device), vy[vi].to(device)

    return {
        "next": lambda step, _batch: batches(step + 1),
        "same": lambda _step, batch: batch,
        "validation": validation,
    }[cfg.loss.meta_batch]


def build_updater(
    cfg: FitConfig, model: nn.Module, loss_fn: nn.Module, data: FitData, batches: _TrainBatches
) -> Updater:
    """The update rule of ``loss.name``: AdaLFL, ML3 (offline phase, then plain), or plain.

    Args:
        cfg: The run's config.
        model: The model to train.
        loss_fn: The loss from :func:`build_fit_loss`.
        data: The datasets (AdaLFL's validation meta batches).
        batches: The training batches (AdaLFL's "next" meta batches).

    Returns:
        An updater: ``set_lr``, ``step(model, batch, step)``, ``state_dict``, ...
    """
    oc, lc = cfg.optim, cfg.loss
    if lc.name == "adalfl":
        adalfl = AdaLFL(
            model,
            loss_fn,
            meta_lr=lc.meta_lr,
            meta_batch=lc.meta_batch,
            task=data.task,
            guard=_guard(loss_fn, lc) or False,
            optimizer=_make_optimizer(oc, model),
            horizon=lc.horizon,
        )
        return AdaLFLUpdater(adalfl, _adalfl_meta_batches(cfg, data, batches))
    if lc.name == "ml3":
        guard = _guard(loss_fn, lc)
        offline = lambda pairs, steps, reset: _ml3_offline(model, loss_fn, oc, lc, pairs, guard)  # noqa: E731
        trained = guard or loss_fn
        return ML3Updater(trained, _make_optimizer(oc, model), offline)
    return OptimizerUpdater(loss_fn, _make_optimizer(oc, model))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
# Config keys that may change between a run and its resumption: they change neither the
# batches nor the arithmetic of a step (display, CPU threads, how often last.pt is written, when
# a streak of non-finite steps stops the run).
FIT_RESUMABLE_CHANGES = frozenset(
    {"train.progress", "train.threads", "train.checkpoint_every", "train.max_nonfinite_steps"}
)


@dataclass
class _FitRun:
    """What one fit carries from step to step, all of it checkpointed but ``started`` (the wall
    clock of ``time_s``): ``running`` holds the batch losses of the current epoch, so that an
    epoch resumed from a checkpoint taken within it logs the same mean train loss as an
    uninterrupted one; ``nonfinite_streak`` counts the skipped steps in a row."""

    cfg: FitConfig
    data: FitData
    run: RunDir
    model: nn.Module
    updater: Updater
    batches: _TrainBatches
    device: torch.device
    step: int = 0
    best: float = math.inf
    running: list[float] = field(default_factory=list)
    nonfinite_streak: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def total_steps(self) -> int:
        return self.batches.steps_per_epoch * self.cfg.train.epochs

    def save_last(self) -> None:
        state = {"model": self.model.state_dict(), "step": self.step, "best": self.best}
        state.update(rng=rng_state(), running=list(self.running))
        state["nonfinite_streak"] = self.nonfinite_streak
        self.run.save_last({**state, **self.updater.state_dict()})

    def resume_or_start(self, resume: bool) -> None:
        """Continue from ``last.pt`` (and cut ``metrics.jsonl`` back to it), or start over."""
        if resume and self.run.has_last():
            state = self.run.load_last(map_location=self.device)
            self.model.load_state_dict(state["model"])
            self.updater.load_state_dict(state)
            self.step, self.best = int(state["step"]), float(state["best"])
            self.running = [float(v) for v in state.get("running", [])]
            self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
            set_rng_state(state["rng"])
            self.run.truncate_metrics(self.step)
            return
        self.run.start_fresh()
        # Snapshots of an earlier run in this folder would mix into plots.
        for old in (self.run.path / "loss_snapshots").glob("*.pt"):
            old.unlink()


def fit(
    config: FitConfig | Mapping[str, Any],
    out_dir: str | Path,
    data: FitData | None = None,
    resume: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train per ``config`` into ``out_dir``; returns the final metrics.

    Args:
        config: A :class:`FitConfig` or the mapping it is validated from.
        out_dir: The run directory (see :class:`npbml.run_dir.RunDir` for its files and the
            ``metrics.jsonl`` record layout, shared with ``npbml train``).
        data: Overrides ``config.data`` (for in-memory datasets).
        resume: Continue an existing ``out_dir/last.pt`` exactly (a changed config is refused,
            but for the keys of :data:`FIT_RESUMABLE_CHANGES`).
        stop_after: Stop once the global step reaches this many steps in total, without final
            evaluation, as a killed run would (work since the last checkpoint is lost); used by
            the resume test and for budgeted runs.

    Returns:
        ``{"step", "final": True, "test_loss", "test_acc", "best_test_loss",
        "best_test_acc"}`` (``acc`` for classification only; ``best_`` when a ``best.pt``
        exists), or ``{"stopped_at": step}`` after ``stop_after``.

    Raises:
        ConfigError: A bad config or dataset, or a changed config on resume.
        FloatingPointError: ``train.max_nonfinite_steps`` steps in a row were not finite.
    """
    cfg = config if isinstance(config, FitConfig) else fit_config_from_dict(config)
    run = RunDir(out_dir, config_name="config.json")
    saved = run.saved_config()
    if resume and run.has_last() and saved is not None:
        run.check_resumable(saved, cfg.to_dict(), ignore=FIT_RESUMABLE_CHANGES)
    t = cfg.train
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    data = data or build_fit_data(cfg)  # bad data stops here, before any file is written
    run.save_config(cfg.to_dict())
    device = torch.device(t.device)
    model = build_fit_model(cfg.model, data).to(device)
    loss_fn = build_fit_loss(cfg.loss, data.task, t.seed, device)
    batches = _TrainBatches(data.train, t.batch_size, t.seed, device)
    updater = build_updater(cfg, model, loss_fn, data, batches)
    state = _FitRun(cfg, data, run, model, updater, batches, device)
    state.resume_or_start(resume)
    if updater.learns_loss and state.step == 0 and cfg.loss.offline_steps > 0:
        _offline_phase(state)
    bar = tqdm(
        total=state.total_steps, initial=state.step, disable=not t.progress, desc="fit", unit="step"
    )
    try:
        if not _train_steps(state, bar, stop_after):
            return {"stopped_at": state.step}
    finally:
        bar.close()
    return _finish(state)


def fit_run_dir(path: str | Path) -> Path | None:
    """The ``npbml fit`` run directory that ``path`` (a run directory or a checkpoint in one)
    belongs to, or ``None`` when it is not one (its ``config.json`` is not a fit config).

    Args:
        path: A directory or a checkpoint file.

    Returns:
        The run directory, or ``None``.
    """
    p = Path(path)
    run = p if p.is_dir() else p.parent
    snapshot = run / "config.json"
    if not snapshot.is_file():
        return None
    try:
        fit_config_from_dict(json.loads(snapshot.read_text()))
    except (ConfigError, ValueError, TypeError):
        return None
    return run


def evaluate_run(
    path: str | Path,
    which: str = "best.pt",
    split: str = "test",
    device: str | torch.device = "cpu",
    root: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint of an ``npbml fit`` run on one split of its data.

    The data and model are rebuilt from the run's ``config.json`` (the split is the run's own:
    the same seed and fractions), the weights loaded from the checkpoint.

    Args:
        path: The run directory, or a checkpoint file in it.
        which: The checkpoint in a run directory (``best.pt`` or ``last.pt``).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        device: Where to evaluate.
        root: Overrides ``data.root`` (Omniglot / IDX data moved since training).

    Returns:
        ``{"split", "checkpoint", "step", "rows", "loss"}`` and ``"accuracy"`` for
        classification.

    Raises:
        ConfigError: ``path`` is not a fit run, or the split has no rows.
        CheckpointError: The checkpoint is missing or damaged.
    """
    run_path = fit_run_dir(path)
    if run_path is None:
        raise ConfigError(f"{path} is not an `npbml fit` run (no fit config.json next to it)")
    p = Path(path)
    ckpt = p if p.is_file() else run_path / which
    cfg = fit_config_from_dict(json.loads((run_path / "config.json").read_text()))
    if root is not None:
        cfg.data.root = root
    data = build_fit_data(cfg)
    rows = {"train": data.train, "validation": data.val, "test": data.test}[split]
    if len(rows[0]) == 0:
        raise ConfigError(f"the {split} split of {run_path} has no rows; choose another --split")
    state = load_checkpoint(ckpt, map_location=device)
    model = build_fit_model(cfg.model, data).to(device)
    model.load_state_dict(state["model"])
    res = _named(evaluate(model, *rows, data.task))
    return {
        "split": split,
        "checkpoint": str(ckpt),
        "step": int(state["step"]),
        "rows": len(rows[0]),
        **res,
    }


def _offline_phase(state: _FitRun) -> None:
    """Meta-learn the loss network offline before step 0 (ML3, or AdaLFL's phase 1)."""
    cfg, data, out, updater = state.cfg, state.data, state.run.path, state.updater
    assert isinstance(updater, (ML3Updater, AdaLFLUpdater))  # only these have learns_loss
    lc, t = cfg.loss, cfg.train
    if lc.meta_batch == "validation" and len(data.val[0]) == 0:
        raise ConfigError("loss.meta_batch='validation' needs validation data")
    pairs = _offline_pairs(data.train, data.val, t.batch_size, t.seed, lc.meta_batch, state.device)
    snap_dir = out / "loss_snapshots"
    snap_dir.mkdir(exist_ok=True)
    torch.save(updater.loss_fn.state_dict(), snap_dir / "init.pt")
    t0 = time.time()
    history = updater.offline_init(pairs, lc.offline_steps, lc.reset_every)
    (out / "offline_meta_loss.json").write_text(
        json.dumps({"seconds": time.time() - t0, "meta_loss": history})
    )
    torch.save(updater.loss_fn.state_dict(), snap_dir / f"step{0:08d}.pt")
    updater.on_offline_done(state.run)


def _train_steps(state: _FitRun, bar: Any, stop_after: int | None) -> bool:
    """Steps until the end (True) or until the run has done ``stop_after`` steps in total
    (False, as a killed run; a run resumed at or past ``stop_after`` takes no step)."""
    t, spe = state.cfg.train, state.batches.steps_per_epoch
    state.model.train()
    while state.step < state.total_steps:
        if stop_after is not None and state.step >= stop_after:
            return False
        epoch = state.step // spe
        lr = _lr_at(state.cfg.optim, epoch, t.epochs)
        state.updater.set_lr(lr)
        base, extra = state.updater.step(state.model, state.batches(state.step), state.step)
        state.step += 1
        if extra.get("skipped") or not math.isfinite(base):
            _skip(state, base)
        else:
            state.nonfinite_streak = 0
            state.running.append(base)
        bar.update(1)
        bar.set_postfix(loss=f"{base:.4f}", **{k: f"{v:.4f}" for k, v in extra.items()})
        end_of_epoch = state.step % spe == 0
        if end_of_epoch:
            _end_epoch(state, epoch, lr)
            state.running = []
        if end_of_epoch or (t.checkpoint_every and state.step % t.checkpoint_every == 0):
            state.save_last()
    return True


def _skip(state: _FitRun, loss: float) -> None:
    """A step whose loss or gradient was not finite (its update was dropped): logged as
    ``npbml train`` logs one, warned; ``train.max_nonfinite_steps`` in a row stop the run."""
    t, run = state.cfg.train, state.run
    state.nonfinite_streak += 1
    # A string, so that metrics.jsonl stays strict JSON (no NaN/Infinity literals).
    run.append_metrics(
        {"step": state.step, "split": "train", "skipped": "nonfinite", "batch_loss": str(loss)}
    )
    warnings.warn(
        f"step {state.step}: non-finite loss ({loss}) or gradient; the update was skipped "
        f"({state.nonfinite_streak}/{t.max_nonfinite_steps} in a row)",
        RuntimeWarning,
        stacklevel=3,
    )
    if state.nonfinite_streak >= t.max_nonfinite_steps:
        raise FloatingPointError(
            f"{state.nonfinite_streak} steps in a row had a non-finite loss or gradient (last at "
            f"step {state.step}); stopped. Check the data for NaN/inf and extreme values, lower "
            "optim.lr, or pick another loss.name; the last checkpoint "
            f"{str(run.last_path)!r} (if any) is intact"
        )


def _end_epoch(state: _FitRun, epoch: int, lr: float) -> None:
    """Validate, log the epoch's train and validation records and keep ``best.pt`` at the
    lowest validation loss."""
    data, run = state.data, state.run
    val = evaluate(state.model, *data.val, data.task)
    record: dict[str, Any] = {"step": state.step, "split": "train", "epoch": epoch + 1}
    if state.running:  # an epoch of skipped steps only has no mean loss
        record["loss"] = float(np.mean(state.running))
    record.update(lr=lr, time_s=time.perf_counter() - state.started)
    record.update(state.updater.on_epoch_end(run, state.step))
    run.append_metrics(record)
    if not val:
        return
    is_best = val["loss"] < state.best
    record = {"step": state.step, "split": "validation", "epoch": epoch + 1, **_named(val)}
    run.append_metrics({**record, "best": is_best})
    if is_best:
        state.best = val["loss"]
        run.save_best({"model": state.model.state_dict(), "step": state.step})


def _named(metrics: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """:func:`evaluate`'s ``loss`` / ``acc`` under the record names ``loss`` / ``accuracy``."""
    names = {"loss": "loss", "acc": "accuracy"}
    return {f"{prefix}{names[k]}": v for k, v in metrics.items()}


def _finish(state: _FitRun) -> dict[str, Any]:
    """Test metrics of the final and the best model, logged once; the learned loss saved."""
    data, run = state.data, state.run
    final: dict[str, Any] = {"step": state.step, "final": True}
    test = evaluate(state.model, *data.test, data.task)
    final.update({f"test_{k}": v for k, v in test.items()})
    best: dict[str, float] = {}
    if run.best_path.exists():
        best_model = build_fit_model(state.cfg.model, data).to(state.device)
        best_model.load_state_dict(run.load_best(state.device)["model"])
        best = evaluate(best_model, *data.test, data.task)
        final.update({f"best_test_{k}": v for k, v in best.items()})
    records = run.read_metrics()
    if not records or not records[-1].get("final"):
        # The record layout of every split, plus the keys of this function's result (read by
        # scripts/loss_comparison.py).
        run.append_metrics({"split": "test", **_named(test), **_named(best, "best_"), **final})
    state.updater.on_finish(run)
    return final


def _ml3_offline(
    model: nn.Module,
    loss_fn: nn.Module,
    oc: FitOptimConfig,
    lc: FitLossConfig,
    pairs: Any,
    guard: GuardedLoss | None,
) -> list[float]:
    """ML3 (Bechtle et al. 2020) meta-training of ``loss_fn`` on a copy of ``model``.

    The unrolled inner step is the base SGD of the run (momentum, Nesterov, weight decay); with
    ``optim.name="adam"``/``"adamw"`` it is plain SGD at ``optim.lr``. Returns the meta-loss
    history.
    """
    if oc.name == "sgd":
        inner = InnerSGD(
            lr=oc.lr,
            momentum=oc.momentum,
            nesterov=oc.nesterov and oc.momentum > 0,
            weight_decay=oc.weight_decay,
        )
    else:
        inner = InnerSGD(lr=oc.lr)
    loss_fn.requires_grad_(True)
    ml3 = ML3(loss_fn, inner_optimizer=inner, meta_lr=lc.meta_lr, guard=guard or False)
    start = copy.deepcopy(model)
    history = ml3.meta_train(lambda: copy.deepcopy(start), pairs, lc.offline_steps, lc.reset_every)
    loss_fn.requires_grad_(False)
    return history


class _ValidationBatches:
    """Validation batches for AdaLFL ``meta_batch="validation"``: the rows of step ``k`` are a
    pure function of ``(seed, k)`` (passes over shuffled validation data), so resume is exact."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_pass = max(1, math.ceil(n / batch_size))

    def indices(self, step: int) -> torch.Tensor:
        rnd, pos = divmod(step, self.per_pass)
        order = _epoch_order(self.seed + 1, rnd, self.n)
        return order[pos * self.bs : (pos + 1) * self.bs]
