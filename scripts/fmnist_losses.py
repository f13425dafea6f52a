"""Learned and hand-made losses on Fashion-MNIST with the papers' protocols, scaled to a CPU.

    python scripts/fmnist_losses.py --models mlp --losses ce label_smoothing sparse_lsr adalfl ml3 \
        --seeds 0 1 2 3 4 --steps 3000 --json docs/fmnist_losses.json

Protocol (what ``docs/losses.md`` reports):

* Data: Fashion-MNIST (:mod:`tasks.idx`; Debian's ``dataset-fashion-mnist`` or ``--root``),
  pixels standardised with the training mean/std (the reference code's MNIST normalisation,
  recomputed for Fashion-MNIST). A validation split of ``--val-size`` images is carved out of the
  60k training images with a fixed permutation (seed 12345); the rest is the training set.
* Base training: ``--steps`` SGD steps at batch 128 (EvoMAL's MNIST protocol: 10,000 steps at
  lr 0.01, batch 128, plain SGD), or with ``--base nesterov`` AdaLFL's base optimiser (Nesterov
  momentum 0.9, weight decay 5e-4). Models: logistic (linear 784 -> 10), MLP (784-256-256-10,
  ReLU) and LeNet-5 (the EvoMAL reference's: tanh, average pooling, 28x28 input without padding),
  Xavier-uniform weights and zero biases as in the reference code.
* Losses: cross-entropy, label smoothing (``F.cross_entropy(label_smoothing=0.1)``), SparseLSR
  (xi = 0.1), ML3 (offline: ``--offline-steps`` unrolled steps of the base optimiser on a
  continued model, meta Adam 1e-3, then frozen), AdaLFL (the same offline phase as its
  initialisation, then one meta step per base step on the next batch, meta Adam 1e-3), and an
  EvoMAL loss (``evomal`` or any ``evomal_*`` row name; ``--evolved``: a prefix formula with
  unit node scalars, or the ``best.json`` of an ``npbml evolve`` search, e.g. with
  ``configs/evomal_fmnist.yaml``, with its tuned scalars; each row records its formula and
  refuses another). ``*_locked`` variants lock the loss's logit-gradient norm to CE's
  (``GuardedLoss(net, 1, 1)``; docs/losses.md, "Why AdaLFL drifted"), ``*_cone`` ones also
  keep its cosine to CE's gradient at least 0.5 (AdaLFL's default guard). ``*_guarded`` variants
  train and meta-train through
  :class:`npbml.loss_learning.GuardedLoss` (this toolkit's bound).
* Tuning, the same for every loss: the learning rate from ``--lrs`` with the best final
  validation accuracy of one run at ``--tune-seed`` (not one of the reported seeds).
* Report: the test split is read once, after tuning, and each final model is evaluated on it
  once; per seed the paired difference to cross-entropy, with the mean and a 95% t-interval.

The JSON is rewritten after every run, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from npbml.evomal import EvolvedLoss, load_evolved_loss
from npbml.inner import InnerSGD
from npbml.loss_learning import ML3, AdaLFL, GuardedLoss
from npbml.losses import LearnedLoss, sparse_label_smoothing
from npbml.models import build_model
from tasks.idx import load_idx_float

SPLIT_SEED = 12345
BATCH = 128
#: Two-sided 97.5% quantiles of Student's t for n - 1 degrees of freedom (n = 2..10).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
#: The evolved formula used when ``--evolved`` is not given: the best loss of this toolkit's
#: EvoMAL search on glyphs (docs/results.md), ``max(y, 1 - y + f)`` = ``C + 1 - p_t`` summed.
DEFAULT_EVOLVED = "max(y, sub(1, sub(y, f)))"
LEARNED = (
    "ml3", "adalfl", "ml3_guarded", "adalfl_guarded", "ml3_locked", "adalfl_locked", "adalfl_cone",
)  # fmt: skip


def make_model(name: str) -> nn.Module:
    """logistic / mlp / lenet5, Xavier-uniform weights and zero biases (the reference's init).

    LeNet-5 and the logistic model are the library's (:mod:`npbml.models.classic`), which
    ``npbml fit`` offers too; the MLP is this protocol's own."""
    if name in ("logistic", "lenet5"):
        return build_model(name, num_classes=10)
    if name != "mlp":
        raise ValueError(f"unknown model {name!r}; use logistic, mlp or lenet5")
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def load_splits(
    root: str | None, val_size: int, standardise: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / validation images (the validation carved from the training split), standardised
    with the training part's mean and std unless ``standardise=False`` (pixels in [0, 1])."""
    x, y = load_idx_float("fashion-mnist", "train", root)
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(x)))
    iv, itr = order[:val_size], order[val_size:]
    mean, std = (x[itr].mean().item(), x[itr].std().item()) if standardise else (0.0, 1.0)
    x = (x - mean) / std
    return {
        "train": (x[itr], y[itr]),
        "val": (x[iv], y[iv]),
        "norm": (torch.tensor(mean), torch.tensor(std)),
    }


def batches(
    data: tuple[torch.Tensor, torch.Tensor], seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches of 128 (a fresh permutation per pass, seeded)."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - BATCH + 1, BATCH):
            idx = perm[i : i + BATCH]
            yield x[idx], y[idx]


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = data
    with torch.no_grad():
        hits = sum(
            int((model(x[i : i + 2000]).argmax(1) == y[i : i + 2000]).sum())
            for i in range(0, len(x), 2000)
        )
    return hits / len(x)


def base_optimizer(args: argparse.Namespace, lr: float) -> dict[str, Any]:
    if args.base == "nesterov":
        return {"lr": lr, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    return {"lr": lr, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}


def fixed_loss(name: str, evolved: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "ce":
        return F.cross_entropy
    if name == "label_smoothing":
        return lambda z, t: F.cross_entropy(z, t, label_smoothing=0.1)
    if name == "sparse_lsr":
        return lambda z, t: sparse_label_smoothing(z, t, 0.1)
    if name.startswith("evomal"):
        # A search's best.json (or EvolvedLoss.save file) keeps its tuned node scalars.
        return load_evolved_loss(evolved) if evolved.endswith(".json") else EvolvedLoss(evolved)
    raise ValueError(f"unknown loss {name!r}")


def offline_pairs(it: Iterator[Any], steps: int) -> Iterator[tuple[Any, Any]]:
    """(train batch, next batch) pairs for the offline phase (the meta batch: the next one)."""
    return ((next(it), next(it)) for _ in range(steps))


def train_run(
    args: argparse.Namespace, data: dict, model_name: str, loss: str, lr: float, seed: int
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one model with one loss; returns the model and the run's facts (time, skips)."""
    torch.manual_seed(seed)
    model = make_model(model_name)
    it = batches(data["train"], seed)
    opt = base_optimizer(args, lr)
    info: dict[str, Any] = {}
    t0 = time.time()
    if loss in LEARNED:
        net = LearnedLoss()  # the papers' form: softmax inputs, 2-50-50-1, softplus output
        # *_guarded: GuardedLoss's default bounds; *_locked: its step keeps CE's norm exactly;
        # *_cone: and its direction within 60 degrees of CE's (AdaLFL's default guard).
        guard: bool | GuardedLoss = loss.endswith("_guarded")
        if loss.endswith("_locked"):
            guard = GuardedLoss(net, 1.0, 1.0)
        elif loss.endswith("_cone"):
            guard = GuardedLoss(net, 1.0, 1.0, min_cosine=0.5)
        if loss.startswith("adalfl"):
            learner = AdaLFL(
                model,
                net,
                base_lr=lr,
                momentum=opt["momentum"],
                nesterov=opt["nesterov"],
                weight_decay=opt["weight_decay"],
                meta_lr=1e-3,
                guard=guard,
                horizon=args.horizon,
            )
            learner.offline_init(offline_pairs(it, args.offline_steps), args.offline_steps)
            current = next(it)
            for _ in range(args.steps):
                following = next(it)
                learner.step(current, following)
                current = following
            info["skipped"] = learner.skipped_steps
        else:
            inner = InnerSGD(**opt)
            ml3 = ML3(net, inner_optimizer=inner, meta_lr=1e-3, guard=guard)
            start = copy.deepcopy(model)
            ml3.meta_train(
                lambda: copy.deepcopy(start),
                offline_pairs(it, args.offline_steps),
                args.offline_steps,
                None,
            )
            net.requires_grad_(False)
            info["skipped"] = _plain_training(model, ml3.loss, it, args.steps, opt)
    else:
        info["skipped"] = _plain_training(
            model, fixed_loss(loss, args.evolved), it, args.steps, opt
        )
    info["seconds"] = round(time.time() - t0, 1)
    return model, info


def _plain_training(
    model: nn.Module, loss_fn: Callable, it: Iterator[Any], steps: int, opt: dict[str, Any]
) -> int:
    """``steps`` torch.optim.SGD steps on ``loss_fn``; returns the number of non-finite skips."""
    sgd = torch.optim.SGD(model.parameters(), **opt)
    skipped = 0
    for _ in range(steps):
        x, y = next(it)
        value = loss_fn(model(x), y)
        if not math.isfinite(value.item()):
            skipped += 1
            continue
        sgd.zero_grad(set_to_none=True)
        value.backward()
        sgd.step()
    return skipped


def paired(results: dict[str, Any], loss: str) -> dict[str, float] | None:
    """Mean paired test-accuracy difference to cross-entropy and its 95% t-interval (points)."""
    a, b = results.get(loss, {}).get("test"), results.get("ce", {}).get("test")
    if not a or not b:
        return None
    seeds = sorted(set(a) & set(b))
    d = [100 * (a[s] - b[s]) for s in seeds]
    if len(d) < 2:
        return None
    half = T975[len(d) - 1] * statistics.stdev(d) / math.sqrt(len(d))
    return {
        "mean": statistics.mean(d),
        "low": statistics.mean(d) - half,
        "high": statistics.mean(d) + half,
        "n": len(d),
        "wins": sum(v > 0 for v in d),
    }


def ml3_knee(args: argparse.Namespace, data: dict, seed: int, guard: bool) -> dict[str, Any]:
    """The ML3 collapse diagnosis (docs/losses.md): the learned ``g(p, 1)``, ``g(p, 0)`` on a
    grid after offline meta-training, then per epoch of training with it (``--knee-images``
    training images, lr 0.01 Nesterov) the validation accuracy, the mean target probability and
    the median ratio of the loss's logit-gradient norm to cross-entropy's."""
    torch.manual_seed(seed)
    x, y = data["train"]
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: args.knee_images]
    it = batches((x[keep], y[keep]), seed)
    model, net = make_model("mlp"), LearnedLoss()
    ml3 = ML3(
        net, inner_optimizer=InnerSGD(**base_optimizer(args, 0.01)), meta_lr=1e-3, guard=guard
    )
    start = copy.deepcopy(model)
    pairs = offline_pairs(it, args.offline_steps)
    ml3.meta_train(lambda: copy.deepcopy(start), pairs, args.offline_steps, None)
    net.requires_grad_(False)
    grid = torch.linspace(0, 1, 11)
    curve = {t: net.g(torch.stack([grid, torch.full_like(grid, float(t))], -1)) for t in (0, 1)}
    sgd = torch.optim.SGD(model.parameters(), **base_optimizer(args, 0.01))
    epochs = []
    for _ in range(args.knee_epochs):
        ratios = []
        for _ in range(args.knee_images // BATCH):
            xb, yb = next(it)
            out = model(xb)
            z = out.detach().requires_grad_()
            (g_loss,) = torch.autograd.grad(ml3.loss(z, yb), z)
            (g_ce,) = torch.autograd.grad(F.cross_entropy(z, yb), z)
            ratios.append(float(g_loss.norm() / g_ce.norm()))
            sgd.zero_grad(set_to_none=True)
            ml3.loss(out, yb).backward()
            sgd.step()
        with torch.no_grad():
            p = torch.softmax(model(data["val"][0]), -1)
        p_t = p.gather(1, data["val"][1][:, None]).mean()
        epochs.append({"val_acc": accuracy(model, data["val"]), "p_t": float(p_t),
                       "grad_ratio": statistics.median(ratios)})  # fmt: skip
    g = {f"g{t}": [round(float(v), 4) for v in c] for t, c in curve.items()}
    return {"seed": seed, "guard": guard, **g, "epochs": epochs}


def _gradient_vs_ce(loss_fn: Callable, model: nn.Module, batch: Any) -> tuple[float, float]:
    """Norm ratio and cosine of ``loss_fn``'s logit gradient to cross-entropy's on ``batch``."""
    x, y = batch
    z = model(x).detach().requires_grad_()
    (g_loss,) = torch.autograd.grad(loss_fn(z, y), z)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    cos = F.cosine_similarity(g_loss.flatten(), g_ce.flatten(), dim=0)
    return float(g_loss.norm() / g_ce.norm()), float(cos)


def trajectory(args: argparse.Namespace, data: dict, loss: str) -> dict[str, Any]:
    """One run of ``loss`` (``ce``, ``adalfl``, ...; the first ``--models``, lr the first
    ``--lrs``, at ``--tune-seed``: the tuning run itself, so no test image is read), measured
    every ``--trajectory-every`` steps: validation accuracy, mean target probability on
    validation, and the loss's logit gradient against cross-entropy's on the current batch.

    Shows how a loss behaves over a long run (docs/losses.md, LeNet-5 at 10,000 steps); AdaLFL
    (Raymond et al., 2023) is trained online exactly as in :func:`train_run`."""
    torch.manual_seed(args.tune_seed)
    model_name, lr = args.models[0], args.lrs[0]
    model = make_model(model_name)
    it = batches(data["train"], args.tune_seed)
    opt = base_optimizer(args, lr)
    if loss == "adalfl":
        net = LearnedLoss()
        # --scale-lock: the logit gradient keeps CE's norm on every batch (both bounds 1).
        guard = GuardedLoss(net, 1.0, 1.0) if args.scale_lock else False
        learner = AdaLFL(model, net, base_lr=lr, momentum=opt["momentum"],
                         nesterov=opt["nesterov"], weight_decay=opt["weight_decay"],
                         meta_lr=1e-3, guard=guard, horizon=args.horizon)  # fmt: skip
        learner.offline_init(offline_pairs(it, args.offline_steps), args.offline_steps)
        loss_fn: Callable = learner.loss
        current = next(it)
    else:
        loss_fn = fixed_loss(loss, args.evolved)
        sgd = torch.optim.SGD(model.parameters(), **opt)
    points = []
    for k in range(1, args.steps + 1):
        if loss == "adalfl":
            following = next(it)
            learner.step(current, following)
            current = following
        else:
            current = next(it)
            sgd.zero_grad(set_to_none=True)
            loss_fn(model(current[0]), current[1]).backward()
            sgd.step()
        if k % args.trajectory_every == 0:
            ratio, cos = _gradient_vs_ce(loss_fn, model, current)
            with torch.no_grad():
                p = torch.softmax(model(data["val"][0]), -1)
            p_t = float(p.gather(1, data["val"][1][:, None]).mean())
            points.append({"step": k, "val_acc": accuracy(model, data["val"]), "p_t": p_t,
                           "grad_ratio": ratio, "cosine": cos})  # fmt: skip
            print(model_name, loss, points[-1], flush=True)
    return {"model": model_name, "lr": lr, "seed": args.tune_seed, "points": points}


def markdown(out: dict[str, Any]) -> str:
    """One table per model: chosen lr, validation accuracy per lr, test mean, paired vs CE."""
    lines: list[str] = []
    for model_name, res in out["results"].items():
        lines += [
            f"#### {model_name}",
            "",
            "| loss | lr (val acc per lr) | test acc, mean +- sd (seeds) | paired vs CE, points "
            "[95% CI] | wins | s/run |",
            "|---|---|---|---|---:|---:|",
        ]
        for loss, entry in res.items():
            vals = ", ".join(f"{lr}: {100 * v:.2f}" for lr, v in entry["val_by_lr"].items())
            tests = [100 * v for v in entry["test"].values()]
            sd = f" +- {statistics.stdev(tests):.2f}" if len(tests) > 1 else ""
            acc = f"{statistics.mean(tests):.2f}{sd} ({len(tests)})" if tests else "-"
            p = entry.get("paired_vs_ce")
            diff = "-" if not p else f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]"
            wins = "-" if not p else f"{p['wins']}/{p['n']}"
            secs = [r["seconds"] for r in entry.get("runs", {}).values()]
            per_run = f"{statistics.mean(secs):.0f}" if secs else "-"
            lr = entry.get("lr", "-")
            lines.append(f"| {loss} | {lr} ({vals}) | {acc} | {diff} | {wins} | {per_run} |")
        lines.append("")
    return "\n".join(lines)


def run_model(
    args: argparse.Namespace, data: dict, model_name: str, out: dict, save: Callable[[], None]
) -> None:
    """Tune every loss's learning rate on validation, then train the reported seeds."""
    res = out["results"].setdefault(model_name, {})
    # The lr each loss's recorded runs were trained at, before this call's tuning (runs recorded
    # without their lr used the choice of that time).
    previous = {loss: res.get(loss, {}).get("lr") for loss in args.losses}
    for loss in args.losses:
        entry = res.setdefault(loss, {"val_by_lr": {}, "test": {}, "runs": {}})
        if loss.startswith("evomal"):
            recorded = entry.setdefault("evolved", args.evolved)
            if recorded != args.evolved and entry["val_by_lr"]:
                raise SystemExit(
                    f"{model_name} {loss} was recorded with --evolved {recorded!r}, not "
                    f"{args.evolved!r}: pass that, or give this formula another row name "
                    "(evomal_NAME)"
                )
        for lr in args.lrs:
            if str(lr) not in entry["val_by_lr"]:
                model, info = train_run(args, data, model_name, loss, lr, args.tune_seed)
                entry["val_by_lr"][str(lr)] = accuracy(model, data["val"])
                print(
                    model_name, loss, "lr", lr, "val", entry["val_by_lr"][str(lr)], info, flush=True
                )
                save()
        entry["lr"] = float(max(entry["val_by_lr"], key=lambda k: entry["val_by_lr"][k]))
    save()
    if not args.seeds:
        return  # tuning only (`--seeds` with no values): the test split is not read
    test = load_idx_float("fashion-mnist", "test", args.root)  # read once, after all tuning
    mean, std = data["norm"]
    test = ((test[0] - mean) / std, test[1])
    for seed, loss in itertools.product(args.seeds, args.losses):
        entry = res[loss]
        done = entry["runs"].get(str(seed), {})
        if str(seed) in entry["test"] and done.get("lr", previous[loss]) == entry["lr"]:
            continue  # recorded at the lr chosen now (a widened grid can change the choice)
        model, info = train_run(args, data, model_name, loss, entry["lr"], seed)
        info["lr"] = entry["lr"]
        entry["test"][str(seed)] = accuracy(model, test)
        entry["runs"][str(seed)] = info
        print(model_name, loss, "seed", seed, "test", entry["test"][str(seed)], info, flush=True)
        for name in res:
            res[name]["paired_vs_ce"] = paired(res, name)
        save()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=["mlp"])
    ap.add_argument(
        "--losses", nargs="+", default=["ce", "label_smoothing", "sparse_lsr", "adalfl", "ml3"]
    )
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4], help="none: tune only")
    ap.add_argument("--tune-seed", type=int, default=100)
    ap.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.03, 0.1])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--offline-steps", type=int, default=250)
    ap.add_argument("--base", choices=["sgd", "nesterov"], default="nesterov")
    ap.add_argument("--scale-lock", action="store_true", help="trajectory: AdaLFL scale-locked")
    ap.add_argument(
        "--horizon", choices=["step", "momentum"], default="step",
        help="AdaLFL's look-ahead: the next step (the paper's) or the momentum's (npbml.inner)",
    )  # fmt: skip
    ap.add_argument("--val-size", type=int, default=10000)
    ap.add_argument(
        "--evolved",
        default=DEFAULT_EVOLVED,
        help="the evomal loss: a prefix formula, or an EvoMAL search's best.json (tuned scalars)",
    )
    ap.add_argument("--root", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", required=True)
    ap.add_argument("--report", action="store_true", help="print the JSON's tables; run nothing")
    ap.add_argument("--knee", nargs="*", type=int, help="seeds of the ML3 collapse diagnosis only")
    ap.add_argument("--knee-guard", action="store_true")
    ap.add_argument("--knee-images", type=int, default=6000)
    ap.add_argument("--knee-epochs", type=int, default=10)
    ap.add_argument("--raw-pixels", action="store_true", help="pixels in [0, 1], not standardised")
    ap.add_argument("--trajectory", nargs="+", help="losses to follow over one run (no test read)")
    ap.add_argument("--trajectory-every", type=int, default=1000)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    out = json.loads(path.read_text()) if path.exists() else {"results": {}}
    if args.report:
        print(markdown(out))
        return out
    out["settings"] = {k: v for k, v in vars(args).items() if k != "json"}

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(path)

    data = load_splits(args.root, args.val_size, standardise=not args.raw_pixels)
    if args.trajectory:
        runs = out.setdefault("trajectory", {})
        for loss in args.trajectory:
            runs[loss] = trajectory(args, data, loss)
            save()
        return out
    if args.knee is not None:
        out["knee"] = [ml3_knee(args, data, seed, args.knee_guard) for seed in args.knee]
        save()
        return out
    for model_name in args.models:
        run_model(args, data, model_name, out, save)
    return out


if __name__ == "__main__":
    main()
