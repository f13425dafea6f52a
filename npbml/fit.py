"""Ordinary (non-episodic) supervised training, with any loss of :mod:`npbml.losses` or AdaLFL.

``fit(config, out_dir)`` trains a model on a class-split image dataset (e.g. every character of
the Omniglot minimal splits, each split per class into train / validation / test images) or on
tabular / regression arrays, with a tqdm progress bar, atomic checkpoints (``last.pt``,
``best.pt``), exact resume and ``metrics.jsonl`` (one JSON record per evaluation).

Losses: ``ce``, ``label_smoothing``, ``sparse_lsr`` (METHODS.md sec 5), ``learned`` (a fixed
loss network, e.g. meta-learned by ML3, loaded from ``loss.checkpoint``), ``ml3`` (the loss network
is first meta-learned offline by ML3 on the training data for ``loss.offline_steps`` steps, Bechtle
et al. arXiv 1906.05374, then frozen to train the model), ``adalfl`` (online loss learning,
Raymond et al. arXiv 2301.13247; METHODS.md sec 4) and ``evolved`` (a symbolic EvoMAL loss loaded
from ``loss.checkpoint``: an ``npbml evolve`` output folder or a saved ``EvolvedLoss`` JSON;
METHODS.md sec 6).

Exact resume: the batch order of epoch ``e`` is a pure function of ``(seed, e)`` and the model,
optimizer, schedule, loss-learning and RNG states are checkpointed, so a run killed and resumed
produces the same weights as an uninterrupted one.

Config: a YAML/dict with sections ``data``, ``model``, ``optim``, ``loss``, ``train``; unknown
keys are errors (validated with the strict dataclass builder of :mod:`npbml.config`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from npbml.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from npbml.config import (  # the fit schema lives with the other configs; re-exported here
    ConfigError,
    FitConfig,
    FitDataConfig,
    FitLossConfig,
    FitModelConfig,
    FitOptimConfig,
    FitTrainConfig,  # noqa: F401  (re-exported: ``from npbml.fit import FitTrainConfig``)
    fit_config_from_dict,
    read_yaml,
)
from npbml.inner import InnerSGD
from npbml.loss_learning.adalfl import AdaLFL
from npbml.loss_learning.ml3 import ML3
from npbml.loss_learning.warm_start import regress_to_cross_entropy
from npbml.losses import LearnedLoss, build_loss


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
            raise ValueError(
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


def split_arrays(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    task: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> FitData:
    """Random train / val / test split of tabular arrays."""
    x = torch.as_tensor(np.asarray(x)).float()
    y = torch.as_tensor(np.asarray(y))
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if task == "classification":
        if y.is_floating_point():
            raise ValueError("classification targets must be integers; use data.task='regression'")
        y = y.long()
        num_outputs = int(y.max()) + 1
    else:
        y = y.float()
        y = y.unsqueeze(1) if y.dim() == 1 else y
        num_outputs = y.shape[1]
    n = len(x)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    n_val, n_test = int(round(val_fraction * n)), int(round(test_fraction * n))
    if n - n_val - n_test < 1:
        raise ValueError("val_fraction + test_fraction leave no training rows")
    iv, it, itr = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    return FitData((x[itr], y[itr]), (x[iv], y[iv]), (x[it], y[it]), task, num_outputs)


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
    arrays = np.load(d.path)
    for key in ("x", "y"):
        if key not in arrays:
            raise ConfigError(f"{d.path}: missing array {key!r} (expected arrays x and y)")
    return split_arrays(
        arrays["x"], arrays["y"], d.task, d.val_fraction, d.test_fraction, cfg.train.seed
    )


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
    if cfg.name.lower() == "conv4":
        options.setdefault("in_channels", x.shape[1])
        options.setdefault("image_size", x.shape[-1])
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


def _write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def fit(
    config: FitConfig | Mapping[str, Any],
    out_dir: str | Path,
    data: FitData | None = None,
    resume: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train per ``config`` into ``out_dir``; returns the final metrics.

    ``data`` overrides ``config.data`` (for in-memory datasets). With ``resume`` (default) an
    existing ``out_dir/last.pt`` is continued exactly. ``stop_after=k`` stops once the global step
    reaches ``k`` without final evaluation, as a killed run would (work since the last checkpoint
    is lost); used by the resume test and for budgeted runs.
    """
    cfg = config if isinstance(config, FitConfig) else fit_config_from_dict(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    resuming = resume and (out / "last.pt").exists() and saved.exists()
    if resuming and json.loads(saved.read_text()) != json.loads(json.dumps(cfg.to_dict())):
        raise ConfigError(
            f"{out} holds a run with a different config: use another output directory, or "
            "resume=False (--no-resume) to start over there"
        )
    saved.write_text(json.dumps(cfg.to_dict(), indent=2))
    t = cfg.train
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    data = data or build_fit_data(cfg)
    device = torch.device(t.device)
    model = build_fit_model(cfg.model, data).to(device)
    lc = cfg.loss
    adalfl: AdaLFL | None = None
    optimizer: torch.optim.Optimizer | None = None
    loss_fn: nn.Module | Any
    if lc.name in ("learned", "ml3", "adalfl"):
        loss_fn = LearnedLoss(
            data.task,
            lc.hidden,
            lc.output_activation,
            init=lc.init,
            inputs=lc.inputs,
        ).to(device)
        if lc.ce_warm_start:
            if data.task != "classification":
                raise ConfigError("loss.ce_warm_start is for classification (data.task)")
            regress_to_cross_entropy(loss_fn, steps=lc.ce_warm_start, seed=t.seed)
        if lc.checkpoint is not None:
            loss_fn.load_state_dict(
                torch.load(lc.checkpoint, map_location=device, weights_only=True)
            )
    elif lc.name == "evolved":
        from npbml.evomal.expression import load_evolved_loss

        if data.task != "classification":
            raise ConfigError("loss.name='evolved' is a classification loss (data.task)")
        loss_fn = load_evolved_loss(lc.checkpoint).to(device)
    elif lc.name in ("label_smoothing", "sparse_lsr"):
        loss_fn = build_loss(lc.name, smoothing=lc.smoothing)
    else:
        loss_fn = build_loss("ce") if data.task == "classification" else _task_loss("regression")
    oc = cfg.optim
    val_batches = None
    if lc.name == "adalfl":
        vx, vy = data.val
        if lc.meta_batch == "validation" and len(vx) == 0:
            raise ConfigError("loss.meta_batch='validation' needs validation data")
        val_batches = _ValidationBatches(len(vx), t.batch_size, t.seed)
        adalfl = AdaLFL(
            model,
            loss_fn,
            base_lr=oc.lr,
            momentum=oc.momentum,
            nesterov=oc.nesterov and oc.momentum > 0,
            weight_decay=oc.weight_decay,
            meta_lr=lc.meta_lr,
            meta_batch=lc.meta_batch,
            task=data.task,
        )
    else:
        if lc.name in ("learned", "ml3", "evolved"):
            loss_fn.requires_grad_(False)  # frozen: only the model is trained
        if oc.name == "sgd":
            optimizer = torch.optim.SGD(
                model.parameters(),
                lr=oc.lr,
                momentum=oc.momentum,
                nesterov=oc.nesterov and oc.momentum > 0,
                weight_decay=oc.weight_decay,
            )
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=oc.lr, weight_decay=oc.weight_decay)

    x, y = data.train
    n = len(x)
    steps_per_epoch = math.ceil(n / t.batch_size)
    total_steps = steps_per_epoch * t.epochs
    step = 0
    best = math.inf
    records: list[dict[str, Any]] = []
    last = out / "last.pt"
    if resume and last.exists():
        state = load_checkpoint(last, map_location=device)
        model.load_state_dict(state["model"])
        if "loss_net" in state:  # ml3: the loss learned offline before step 0
            loss_fn.load_state_dict(state["loss_net"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if adalfl is not None:
            adalfl.load_state_dict(state["adalfl"])
        step, best = int(state["step"]), float(state["best"])
        set_rng_state(state["rng"])
        if (out / "metrics.jsonl").exists():
            lines = (out / "metrics.jsonl").read_text().splitlines()
            records = [r for r in map(json.loads, lines) if r.get("step", 0) <= step]
    else:
        # A fresh start: snapshots of an earlier run in this folder would mix into plots.
        for old in (out / "loss_snapshots").glob("*.pt"):
            old.unlink()
    if lc.name in ("ml3", "adalfl") and step == 0 and lc.offline_steps > 0:
        if lc.meta_batch == "validation" and len(data.val[0]) == 0:
            raise ConfigError("loss.meta_batch='validation' needs validation data")
        pairs = _offline_pairs(data.train, data.val, t.batch_size, t.seed, lc.meta_batch, device)
        snap_dir = out / "loss_snapshots"
        snap_dir.mkdir(exist_ok=True)
        torch.save(loss_fn.state_dict(), snap_dir / "init.pt")
        t0 = time.time()
        if adalfl is not None:
            history = adalfl.offline_init(pairs, lc.offline_steps, lc.reset_every)
        else:
            history = _ml3_offline(model, loss_fn, oc, lc, pairs)
        (out / "offline_meta_loss.json").write_text(
            json.dumps({"seconds": time.time() - t0, "meta_loss": history})
        )
        torch.save(loss_fn.state_dict(), snap_dir / f"step{0:08d}.pt")
        if adalfl is None:
            torch.save(loss_fn.state_dict(), out / "loss_net.pt")

    def checkpoint() -> None:
        state = {"model": model.state_dict(), "step": step, "best": best, "rng": rng_state()}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if adalfl is not None:
            state["adalfl"] = adalfl.state_dict()
        elif lc.name == "ml3":
            state["loss_net"] = loss_fn.state_dict()
        save_checkpoint(last, state)

    bar = tqdm(total=total_steps, initial=step, disable=not t.progress, desc="fit", unit="step")
    model.train()
    running: list[float] = []
    while step < total_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        lr = _lr_at(oc, epoch, t.epochs)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        if adalfl is not None:
            adalfl.set_base_lr(lr)
        order = _epoch_order(t.seed, epoch, n)
        idx = order[pos * t.batch_size : (pos + 1) * t.batch_size]
        xb, yb = x[idx].to(device), y[idx].to(device)
        extra: dict[str, float] = {}
        if adalfl is not None:
            if lc.meta_batch == "next":
                nxt = order[(pos + 1) * t.batch_size : (pos + 2) * t.batch_size]
                if len(nxt) == 0:  # last batch of the epoch: the next epoch's first batch
                    nxt = _epoch_order(t.seed, epoch + 1, n)[: t.batch_size]
                base, meta = adalfl.step((xb, yb), (x[nxt].to(device), y[nxt].to(device)))
            elif lc.meta_batch == "same":
                base, meta = adalfl.step((xb, yb), (xb, yb))
            else:
                vi = val_batches.indices(step)
                base, meta = adalfl.step((xb, yb), (vx[vi].to(device), vy[vi].to(device)))
            extra = {"meta_loss": meta, "skipped": int(adalfl.last_step.skipped)}
        else:
            assert optimizer is not None
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            base = loss.item()
        running.append(base)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{base:.4f}", **{k: f"{v:.4f}" for k, v in extra.items()})
        end_of_epoch = step % steps_per_epoch == 0
        if end_of_epoch:
            val = evaluate(model, *data.val, data.task)
            record = {
                "step": step,
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": float(np.mean(running)),
                "time": time.time(),
            }
            record.update({f"val_{k}": v for k, v in val.items()})
            if adalfl is not None:
                record["skipped_steps"] = adalfl.skipped_steps
                # Snapshots of phi for plots of the loss over the run (npbml.plots).
                snap_dir = out / "loss_snapshots"
                snap_dir.mkdir(exist_ok=True)
                torch.save(adalfl.loss_net.state_dict(), snap_dir / f"step{step:08d}.pt")
            records.append(record)
            _write_metrics(out / "metrics.jsonl", records)
            running = []
            if val and val["loss"] < best:
                best = val["loss"]
                save_checkpoint(out / "best.pt", {"model": model.state_dict(), "step": step})
        if end_of_epoch or (t.checkpoint_every and step % t.checkpoint_every == 0):
            checkpoint()
        if stop_after is not None and step >= stop_after:
            bar.close()
            return {"stopped_at": step}
    bar.close()
    final = {"step": step, "final": True}
    final.update({f"test_{k}": v for k, v in evaluate(model, *data.test, data.task).items()})
    if (out / "best.pt").exists():
        best_model = build_fit_model(cfg.model, data).to(device)
        best_model.load_state_dict(load_checkpoint(out / "best.pt", device)["model"])
        final.update(
            {f"best_test_{k}": v for k, v in evaluate(best_model, *data.test, data.task).items()}
        )
    if not records or not records[-1].get("final"):
        records.append(final)
        _write_metrics(out / "metrics.jsonl", records)
    if adalfl is not None:
        torch.save(adalfl.loss_net.state_dict(), out / "loss_net.pt")
    return final


def _ml3_offline(
    model: nn.Module, loss_fn: nn.Module, oc: FitOptimConfig, lc: FitLossConfig, pairs: Any
) -> list[float]:
    """ML3 (Bechtle et al. 2020) meta-training of ``loss_fn`` on a copy of ``model``.

    The unrolled inner step is the base SGD of the run (momentum, Nesterov, weight decay); with
    ``optim.name="adam"`` it is plain SGD at ``optim.lr``. Returns the meta-loss history.
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
    ml3 = ML3(loss_fn, inner_optimizer=inner, meta_lr=lc.meta_lr)
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


# ---------------------------------------------------------------------------------------------
# Command line (wired by npbml/cli.py as ``npbml fit``)
# ---------------------------------------------------------------------------------------------
FIT_HELP = (
    "ordinary supervised training (CE, label smoothing, SparseLSR, learned loss, ML3, AdaLFL, "
    "evolved loss)"
)


def fit_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``npbml fit`` to parser ``p``."""
    p.add_argument("--config", required=True, help="YAML file with data/model/optim/loss/train")
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics.jsonl)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable)",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore an existing last.pt")


def add_fit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``fit`` sub-command to an ``argparse`` sub-parsers object; returns its parser
    (``args.func`` is :func:`run_fit`)."""
    p = subparsers.add_parser("fit", help=FIT_HELP, description=FIT_HELP)
    fit_arguments(p)
    p.set_defaults(func=run_fit)
    return p


def run_fit(args: argparse.Namespace) -> int:
    """Entry point of ``npbml fit``: load and validate the config, train, print final metrics."""
    from npbml.config import apply_overrides

    raw = apply_overrides(read_yaml(args.config), args.set)
    cfg = fit_config_from_dict(raw)
    final = fit(cfg, args.out, resume=not args.no_resume)
    print(json.dumps(final))
    return 0


def _register_cli() -> None:
    """Register ``npbml fit`` with :mod:`npbml.cli` (active once ``"npbml.fit"`` is listed in
    ``npbml.cli.SUBCOMMAND_MODULES``, which imports this module)."""
    try:
        from npbml.cli import _SUBCOMMANDS, subcommand
    except ImportError:  # a CLI without the registry: use add_fit_parser instead
        return
    if "fit" not in _SUBCOMMANDS:
        subcommand("fit", FIT_HELP, fit_arguments)(run_fit)


_register_cli()
