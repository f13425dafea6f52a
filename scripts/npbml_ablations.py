"""MAML, the nearest-prototype baseline, and NPBML with its ablation rows (paper Tables 3-4) under
one budget, on one CPU box, compared on the same fixed test episodes with paired differences.

Pipeline, for every seed of ``--seeds``: pre-train the backbone (recipe: ``--pretrain-steps``,
``--pretrain-batch``, ``--pretrain-lr``; the best-validation checkpoint is kept, validated every
``--pretrain-eval-every`` steps on ``--pretrain-val-episodes`` episodes) and the relation network
once (shared by every NPBML row of that seed); meta-train every row for the same number of
meta-steps and meta-batch size (the same number of training tasks); then test each row on the SAME
fixed test episodes (``--tasks`` of them, drawn with ``--test-seed`` whatever the training seed,
within one alphabet with ``--within-alphabet``). The ``proto-cosine`` / ``proto-euclidean`` rows
are the nearest-prototype classifier (Snell et al. 2017; SimpleShot, Wang et al. 2019;
:class:`npbml.algorithms.prototype.PrototypeClassifier`) on the very backbone the NPBML rows start
from: no meta-learning at all. With ``--lake PATH`` every row is also scored on Lake et al.'s
20-way one-shot runs.

Comparisons (docs/methods/protocol.md): for each ``--reference`` row R and every other row A, the
paired per-episode differences A - R with their 95% interval (mean +- 1.96 s / sqrt(n)), per seed
and pooled over seeds (:func:`npbml.evaluate.pooled_paired_difference`).

Training rows run as separate ``npbml train`` processes, ``--workers`` at a time (one torch thread
each); evaluation runs in this process (:func:`npbml.train.load_learner`,
:func:`npbml.evaluate.evaluate` with per-episode accuracies). Writes ``OUT/results.json`` and,
with ``--markdown FILE``, the tables between markers in FILE.

    python scripts/npbml_ablations.py --out runs/ablations --markdown docs/results.md
    python scripts/npbml_ablations.py --ways 20 --within-alphabet --seeds 0 1 2 \\
        --rows maml proto-cosine init full --pretrain-steps 4000 --pretrain-batch 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(ROOT))

NPBML_ROWS = [
    "init",
    "+optimizer",
    "+loss",
    "+optimizer+loss",
    "full",
    "loss:+support",
    "loss:+query",
    "loss:+reg",
]
# A row may add NPBML options to an ablation row: "full/head_init=proto" is the full row with the
# Proto-MAML head (ROW/KEY=VALUE[/KEY=VALUE...], values as in --set).
OPTION_SEP = "/"


def base_row(row: str) -> str:
    """The ablation row a variant row builds on (``"full/head_init=proto"`` -> ``"full"``)."""
    return row.split(OPTION_SEP, 1)[0]


# Not an NPBML option but the relation network a row uses: "full/relation=features" scores the
# backbone's frozen features (`npbml pretrain-relation --backbone`, RelationNetwork(reads=
# "features")) instead of the default image relation network (issue 13); "relation=features+K"
# puts K conv blocks of the relation network's own on top of them (`--encoder-blocks K`).
FEATURE_RELATION = "relation=features"


def _feature_token(row: str) -> str | None:
    tokens = row.split(OPTION_SEP)[1:]
    hits = [kv for kv in tokens if kv.split("+", 1)[0] == FEATURE_RELATION]
    return hits[0] if hits else None


def row_options(row: str) -> list[str]:
    """The ``KEY=VALUE`` NPBML option overrides of a variant row (empty for a plain row)."""
    token = _feature_token(row)
    return [kv for kv in row.split(OPTION_SEP)[1:] if kv != token]


def _feature_relation_text(args: argparse.Namespace) -> str:
    """The feature relation network's recipe, for a run with ``relation=features`` rows."""
    if not any(reads_features(r) for r in args.rows):
        return ""
    steps, _ = _feature_steps(args)
    own = "; relation=features+K adds K conv blocks of its own"
    own = own if any(encoder_blocks(r) for r in args.rows) else ""
    return f", on the backbone's frozen features (relation=features rows{own}) {steps} steps"


def _feature_steps(args: argparse.Namespace) -> tuple[int, str]:
    """The feature relation networks' pre-training steps, and the suffix that marks them in file
    and run names when they differ from the image network's (``"_1000"``; else ``""``)."""
    steps = getattr(args, "relation_features_steps", None) or args.relation_steps
    return steps, "" if steps == args.relation_steps else f"_{steps}"


def reads_features(row: str) -> bool:
    """Whether a row uses the relation network on the backbone's frozen features."""
    return _feature_token(row) is not None


def encoder_blocks(row: str) -> int:
    """The feature relation network's own conv blocks (``relation=features+K`` -> ``K``)."""
    token = _feature_token(row)
    if token is None or "+" not in token:
        return 0
    k = token.split("+", 1)[1]
    if not k.isdigit():
        raise ValueError(f"{token!r}: write relation=features+K with K a number of blocks")
    return int(k)


# Nearest-prototype rows -> distance ("proto" is short for the cosine one).
PROTO_ROWS = {"proto-cosine": "cosine", "proto-euclidean": "euclidean", "proto": "cosine"}
DEFAULT_ROWS = ["maml", "proto-cosine", "proto-euclidean", *NPBML_ROWS]
# NPBML rows whose learned loss has no transductive term: they need no relation network.
NO_RELATION_ROWS = {"init", "+optimizer", "loss:+support", "loss:+reg"}
# --quick: tiny settings so that a test runs the whole pipeline in well under a minute.
QUICK = {
    "meta_steps": 2,
    "meta_batch": 1,
    "pretrain_steps": 4,
    "pretrain_batch": 16,
    "pretrain_eval_every": 2,
    "pretrain_val_episodes": 2,
    "relation_steps": 2,
    "tasks": 6,
}
QUICK_TRAIN_SETS = ["train.val_every=2", "train.val_tasks=2", "train.log_every=1"]


def markers(label: str) -> tuple[str, str]:
    """Markers of this run's section in the Markdown file (one section per ``--label``)."""
    tag = f"npbml_ablations:{label}" if label else "npbml_ablations"
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


def npbml(*args: str, log: Path) -> str:
    """Run ``python -m npbml ARGS`` on one thread; return stdout; raise with the log on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "npbml", *args]
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(r.stdout)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args[:1])} failed (exit {r.returncode}); see {log}")
    return r.stdout


def _with_sets(args: list[str], sets: list[str]) -> list[str]:
    return [*args, *(x for s in sets for x in ("--set", s))]


# ---------------------------------------------------------------------------------------------
# Pre-training (per seed)
# ---------------------------------------------------------------------------------------------


def pretrain(args: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    """Backbone (best-validation checkpoint) and, when a row needs it, relation network of
    ``seed`` into ``out``; existing files are reused. Returns what was used, with timings."""
    backbone, relation = out / "backbone.pt", out / "relation.pt"
    need_relation = any(
        base_row(r) in NPBML_ROWS and base_row(r) not in NO_RELATION_ROWS for r in args.rows
    )
    data_sets = [f"data.ways={args.ways}"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        jobs = []
        if not backbone.exists():
            cmd = ["pretrain", "--config", args.config, "--out", str(backbone)]
            cmd += ["--steps", str(args.pretrain_steps), "--batch-size", str(args.pretrain_batch)]
            cmd += ["--lr", str(args.pretrain_lr), "--eval-every", str(args.pretrain_eval_every)]
            cmd += ["--val-episodes", str(args.pretrain_val_episodes), "--seed", str(seed)]
            jobs.append(pool.submit(npbml, *_with_sets(cmd, data_sets), log=out / "pretrain.log"))
        if need_relation and not relation.exists():
            cmd = ["pretrain-relation", "--config", args.config, "--out", str(relation)]
            cmd += ["--channels", "32", "--steps", str(args.relation_steps)]
            cmd += ["--eval-every", str(min(100, args.relation_steps)), "--seed", str(seed)]
            jobs.append(
                pool.submit(npbml, *_with_sets(cmd, data_sets), log=out / "pretrain_relation.log")
            )
        for j in jobs:
            j.result()
    feature_relations = {
        k: _feature_relation(args, seed, out, backbone, k, data_sets)
        for k in sorted({encoder_blocks(r) for r in args.rows if reads_features(r)})
    }
    return {
        "backbone": str(backbone),
        "relation": str(relation) if need_relation else None,
        "relation_features": {k: str(p) for k, p in feature_relations.items()},
        "recipe": (
            f"{args.pretrain_steps} steps x batch {args.pretrain_batch}, lr {args.pretrain_lr:g}, "
            f"best of validation every {args.pretrain_eval_every} steps "
            f"({args.pretrain_val_episodes} episodes)"
        ),
        "relation_steps": args.relation_steps if need_relation else 0,
        "pretrain_s": round(time.perf_counter() - t0, 1),
    }


def _feature_relation(
    args: argparse.Namespace, seed: int, out: Path, backbone: Path, blocks: int, sets: list[str]
) -> Path:
    """The feature relation network with ``blocks`` own blocks of ``seed`` (reused if there)."""
    steps, suffix = _feature_steps(args)
    path = out / f"relation_features{f'_b{blocks}' if blocks else ''}{suffix}.pt"
    if not path.exists():
        cmd = ["pretrain-relation", "--config", args.config, "--out", str(path)]
        cmd += ["--backbone", str(backbone), "--steps", str(steps)]
        cmd += ["--eval-every", str(min(100, steps)), "--seed", str(seed)]
        cmd += ["--encoder-blocks", str(blocks)] if blocks else []
        npbml(*_with_sets(cmd, sets), log=out / f"{path.stem}.log")
    return path


# ---------------------------------------------------------------------------------------------
# Fixed test episodes and in-process evaluation
# ---------------------------------------------------------------------------------------------


def test_sampler(args: argparse.Namespace) -> Any:
    """The fixed test episodes shared by every row and seed: the config's data section at
    ``--ways``, sampled with ``--test-seed`` (within one alphabet with ``--within-alphabet``)."""
    from npbml.config import load_config
    from npbml.train import make_tasksets

    return make_tasksets(load_config(args.config, test_data_sets(args))).test


def test_data_sets(args: argparse.Namespace) -> list[str]:
    """Config overrides under which the config's test sampler draws the fixed test episodes."""
    sets = [f"data.ways={args.ways}", f"train.seed={args.test_seed}"]
    if args.test_queries is not None:
        sets.append(f"data.test_queries={args.test_queries}")
    if args.within_alphabet:
        sets.append("data.options.within_alphabet=test")
    return sets


def evaluate_learner(learner: Any, sampler: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Per-episode test accuracies (and Lake's error rate with ``--lake``) of one learner."""
    from npbml.evaluate import evaluate, evaluate_lake

    res = evaluate(learner, sampler, args.tasks, per_task=True)
    if args.lake:
        from tasks.lake import LakeRuns

        image_size = int(sampler.sample(0).support_x.shape[-1])
        lake = evaluate_lake(learner, LakeRuns(args.lake, image_size=image_size))
        res["lake"] = {k: v for k, v in lake.items() if k != "per_run_errors"}
    return res


def proto_row(
    row: str, args: argparse.Namespace, pre: dict[str, Any], out: Path, sampler: Any
) -> dict[str, Any]:
    """Nearest prototype (no training) on the backbone the NPBML rows of this seed start from.

    Also writes ``OUT/seedS/<row>.pt``, a learner checkpoint that ``npbml eval --checkpoint``
    reads like a trained run's (its config draws the same test episodes)."""
    from npbml.algorithms.prototype import PrototypeClassifier
    from npbml.config import load_config
    from npbml.models import build_model
    from npbml.pretrain import load_backbone_weights

    distance = PROTO_ROWS[row]
    sets = [
        *test_data_sets(args),
        "algorithm.name=proto",
        f"algorithm.options={{distance: {distance}}}",
    ]
    config = load_config(args.config, sets)
    x = sampler.sample(0).support_x
    kwargs = {"num_classes": args.ways, "in_channels": int(x.shape[1])}
    kwargs["image_size"] = int(x.shape[-1])
    model = build_model(config.model.name, **{**kwargs, **config.model.options})
    load_backbone_weights(model, pre["backbone"])
    learner = PrototypeClassifier(model, distance=distance)  # type: ignore[arg-type]
    save_learner_checkpoint(out / f"{row}.pt", learner, config, kwargs)
    res = evaluate_learner(learner, sampler, args)
    return {"row": row, "train_s": 0.0, "best_val_accuracy": None, **res}


def save_learner_checkpoint(path: Path, learner: Any, config: Any, model_kwargs: dict) -> None:
    """A checkpoint of an untrained learner in the layout :func:`npbml.train.load_learner` reads
    (step 0, no optimizer state): what ``npbml eval`` needs."""
    from npbml.checkpoint import save_checkpoint
    from npbml.train import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": 0,
        "config": config.to_dict(),
        "model_kwargs": dict(model_kwargs),
        "learner": learner.state_dict(),
    }
    save_checkpoint(path, state)


def trained_row(
    row: str, args: argparse.Namespace, seed: int, pre: dict[str, Any], out: Path, sampler: Any
) -> dict[str, Any]:
    """Meta-train one row (``npbml train``) and evaluate its best-validation checkpoint."""
    from npbml.train import load_learner

    name = "maml" if row == "maml" else row.replace(":", "_").replace("+", "plus_")
    name = name.replace(OPTION_SEP, "__").replace("=", "-")
    features = reads_features(row)
    relation = pre["relation_features"][encoder_blocks(row)] if features else pre["relation"]
    if features:
        name += _feature_steps(args)[1]  # the blocks are in the row's name already
    run, log = out / name, out / f"{name}.log"
    sets = [
        f"train.meta_steps={args.meta_steps}",
        f"train.meta_batch_size={args.meta_batch}",
        f"train.seed={seed}",
        f"data.ways={args.ways}",
        *([f"train.meta_lr={args.meta_lr}"] if args.meta_lr else []),
        *(QUICK_TRAIN_SETS if args.quick else []),
    ]
    if row != "maml":
        sets += [f"algorithm.options.ablation={base_row(row)}"]
        sets += [f"algorithm.options.{kv}" for kv in row_options(row)]
        sets += [f"algorithm.options.backbone_checkpoint={Path(pre['backbone']).resolve()}"]
        if relation:
            sets += [f"algorithm.options.relation_checkpoint={Path(relation).resolve()}"]
    config = args.maml_config if row == "maml" else args.config
    # A finished run with the same command is reused (e.g. one 20-way training scored on
    # cross- and on within-alphabet test episodes by two invocations with the same --out).
    done = run / "ablation_done.json"
    cmd = ["train", "--config", config, "--out", str(run), "--quiet"]
    previous = json.loads(done.read_text()) if done.exists() else {}
    if previous.get("cmd") == _with_sets(cmd, sets):
        train_s = previous["train_s"]
    else:
        t0 = time.perf_counter()
        npbml(*_with_sets(cmd, sets), log=log)
        train_s = time.perf_counter() - t0
        done.write_text(json.dumps({"cmd": _with_sets(cmd, sets), "train_s": train_s}))
    vals = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"validation"' in line
    ]
    best_val = max((v["accuracy"] for v in vals), default=float("nan"))
    learner, _, _ = load_learner(run, "cpu")
    res = evaluate_learner(learner, sampler, args)
    return {"row": row, "train_s": round(train_s, 1), "best_val_accuracy": best_val, **res}


def run_seed(args: argparse.Namespace, seed: int, sampler: Any) -> dict[str, Any]:
    """Every row of one seed; returns ``{"pretraining": ..., "rows": {row: result}}``."""
    out = Path(args.out) / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    pre = pretrain(args, seed, out)

    def one(row: str) -> dict[str, Any]:
        if row in PROTO_ROWS:
            return proto_row(row, args, pre, out, sampler)
        return trained_row(row, args, seed, pre, out, sampler)

    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(one, args.rows))
    for r in results:
        brief = {k: v for k, v in r.items() if k != "accuracies"}
        print(json.dumps({"seed": seed, **brief}), flush=True)
    return {"pretraining": pre, "rows": {r["row"]: r for r in results}}


# ---------------------------------------------------------------------------------------------
# Summaries: pooled accuracies and paired differences
# ---------------------------------------------------------------------------------------------


def summarize(args: argparse.Namespace, per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Pooled accuracy of every row and paired differences against every reference row."""
    from npbml.evaluate import mean_confidence_interval, pooled_paired_difference

    seeds = list(per_seed)

    def accs(row: str) -> np.ndarray:  # [seeds, episodes]
        return np.asarray([per_seed[s]["rows"][row]["accuracies"] for s in seeds])

    rows: dict[str, Any] = {}
    for row in args.rows:
        a = accs(row)
        mean, h = mean_confidence_interval(a.mean(axis=0))  # episodes shared across seeds
        seed_means = a.mean(axis=1)
        rows[row] = {
            "accuracy": mean,
            "ci95": h,
            "per_seed": seed_means.tolist(),
            "seed_sd": float(seed_means.std(ddof=1)) if len(seeds) > 1 else float("nan"),
        }
    paired: dict[str, dict[str, Any]] = {}
    for ref in args.reference:
        paired[ref] = {
            row: pooled_paired_difference(accs(row), accs(ref)) for row in args.rows if row != ref
        }
    return {"rows": rows, "paired": paired}


def _pp(x: float | None, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _mean_over_seeds(per_seed: dict[int, dict[str, Any]], row: str, key: str) -> float | None:
    vals = [per_seed[s]["rows"][row].get(key) for s in per_seed]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def markdown(
    results: dict[str, Any], args: argparse.Namespace, per_seed: dict[int, dict[str, Any]]
) -> str:
    """The Markdown section: setup, the accuracy table and the paired-difference table."""
    cmd = results.get("command") or " ".join(["python scripts/npbml_ablations.py", *sys.argv[1:]])
    start, end = markers(args.label)
    summary, seeds = results["summary"], list(per_seed)
    kind = "within-alphabet" if args.within_alphabet else "cross-alphabet"
    title = f"NPBML ablations on Omniglot minimal ({args.ways}-way 1-shot {kind}, CPU"
    title += f", {args.label})" if args.label else ")"
    pre = per_seed[seeds[0]]["pretraining"]
    lr = f", meta-lr {args.meta_lr:g}" if args.meta_lr else ""
    refs = [r for r in args.reference if r in summary["paired"]]
    lines = [
        start,
        f"## {title}",
        "",
        f"Command: `{cmd}`  ",
        f"Seeds {', '.join(map(str, seeds))}; {args.meta_steps} meta-steps x meta-batch "
        f"{args.meta_batch} for every trained row{lr}. Test: the same {args.tasks} fixed "
        f"{args.ways}-way 1-shot {kind} episodes (test seed {args.test_seed}) of the "
        "background_small2 characters not in small1, for every row and seed. Accuracy: mean "
        "over seeds and episodes +- 95% interval over the seed-averaged per-episode accuracies "
        "(1.96 s / sqrt(n)); per-seed means after it. Backbone (per seed, shared by the NPBML and "
        f"proto rows): {pre['recipe']}; relation network {pre['relation_steps']} steps"
        f"{_feature_relation_text(args)}. proto: nearest prototype on that backbone, no "
        "meta-learning.",
        "",
        "| row | test acc. (%) | 95% CI | per seed (%) | best val (%) | train (s) | diverged |"
        + "".join(f" vs {r} (pp) |" for r in refs)
        + (" Lake error (%) |" if args.lake else ""),
        "|---|---:|---:|---|---:|---:|---:|" + "---:|" * len(refs) + ("---:|" if args.lake else ""),
    ]
    for row in args.rows:
        s = summary["rows"][row]
        line = (
            f"| {row} | {_pp(s['accuracy'])} | {_pp(s['ci95'])} | "
            f"{' / '.join(_pp(v) for v in s['per_seed'])} | "
            f"{_pp(_mean_over_seeds(per_seed, row, 'best_val_accuracy'))} | "
            f"{_mean_over_seeds(per_seed, row, 'train_s') or 0:.0f} | {_diverged(per_seed, row)} |"
        )
        for ref in refs:
            d = summary["paired"][ref].get(row)
            line += f" {_pp(d['mean'], True)} +- {_pp(d['ci95'])} |" if d else " - |"
        if args.lake:
            errs = [per_seed[x]["rows"][row]["lake"]["error_rate"] for x in seeds]
            line += f" {_pp(float(np.mean(errs)))} |"
        lines.append(line)
    lines += paired_table(summary, refs, seeds) + [end]
    return "\n".join(lines) + "\n"


def _diverged(per_seed: dict[int, dict[str, Any]], row: str) -> str:
    """Test episodes (all seeds) whose adapted logits left the bound, ``-`` if not measured."""
    counts = [per_seed[s]["rows"][row].get("diverged") for s in per_seed]
    return "-" if any(c is None for c in counts) else str(sum(counts))


def paired_table(summary: dict[str, Any], refs: list[str], seeds: list[int]) -> list[str]:
    """Paired per-episode differences, each seed and pooled (percentage points)."""
    if not refs:
        return []
    lines = [
        "",
        "Paired per-episode differences A - B on the same episodes (percentage points, mean +- "
        "1.96 s / sqrt(n)); pooled: mean over seeds, interval over the seed-averaged per-episode "
        "differences, and the standard deviation of the per-seed means.",
        "",
        "| A - B | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | pooled | seed sd | wins/losses |",
        "|---|" + "---:|" * (len(seeds) + 3),
    ]
    for ref in refs:
        for row, d in summary["paired"][ref].items():
            cells = [f"{_pp(p['mean'], True)} +- {_pp(p['ci95'])}" for p in d["per_seed"]]
            wins = sum(p["wins"] for p in d["per_seed"])
            losses = sum(p["losses"] for p in d["per_seed"])
            lines.append(
                f"| {row} - {ref} | {' | '.join(cells)} | {_pp(d['mean'], True)} +- "
                f"{_pp(d['ci95'])} | {_pp(d['seed_sd'])} | {wins}/{losses} |"
            )
    return lines


def write_markdown(path: Path, block: str, label: str) -> None:
    start, end = markers(label)
    text = path.read_text() if path.exists() else "# Results\n\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--config", default="configs/npbml_omniglot_minimal.yaml")
    p.add_argument("--maml-config", default="configs/omniglot_minimal.yaml")
    p.add_argument("--out", default="runs/npbml_ablations")
    p.add_argument(
        "--rows", nargs="+", default=DEFAULT_ROWS, help=f"default: {' '.join(DEFAULT_ROWS)}"
    )
    p.add_argument("--meta-steps", type=int, default=300)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=600, help="backbone steps (600)")
    p.add_argument("--pretrain-batch", type=int, default=64, help="backbone batch size (64)")
    p.add_argument("--pretrain-lr", type=float, default=0.05, help="backbone SGD lr (0.05)")
    p.add_argument(
        "--pretrain-eval-every",
        type=int,
        default=200,
        help="validate the backbone every N steps; the best-validation weights are kept (200)",
    )
    p.add_argument("--pretrain-val-episodes", type=int, default=50, help="(50)")
    p.add_argument("--relation-steps", type=int, default=300)
    p.add_argument(
        "--relation-features-steps",
        type=int,
        default=None,
        help="pre-training steps of the feature relation network (rows with relation=features; "
        "default --relation-steps)",
    )
    p.add_argument("--tasks", type=int, default=600, help="fixed test episodes (600)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (0)")
    p.add_argument("--seed", type=int, default=None, help="one training seed (= --seeds SEED)")
    p.add_argument("--test-seed", type=int, default=0, help="seed of the test episodes (0)")
    p.add_argument(
        "--test-queries",
        type=int,
        default=None,
        help="query images per class in the test episodes (default: the config's)",
    )
    p.add_argument(
        "--within-alphabet",
        action="store_true",
        help="test episodes with all N classes from one alphabet (Lake et al. 2015)",
    )
    p.add_argument(
        "--reference",
        nargs="*",
        default=["proto-cosine", "init"],
        help="rows every other row is compared with, paired per episode (proto-cosine init)",
    )
    p.add_argument("--meta-lr", type=float, default=None, help="override train.meta_lr")
    p.add_argument("--label", default="", help="names this run's Markdown section")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ways", type=int, default=5, help="N-way (use 20 with --lake)")
    p.add_argument("--lake", default=None, help="all_runs.zip or its folder (needs --ways 20)")
    p.add_argument("--markdown", default=None, help="update this Markdown file's section")
    p.add_argument("--quick", action="store_true", help=f"tiny settings for a smoke test: {QUICK}")
    p.add_argument(
        "--render",
        action="store_true",
        help="only write the Markdown section of OUT/results.json (with --markdown)",
    )
    p.add_argument("--command", default=None, help="with --render: the command to print")
    return check_args(p, p.parse_args(argv))


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Resolve --seed/--seeds and --quick; reject rows and references the script cannot run."""
    if args.seeds is not None and args.seed is not None:
        p.error("give --seeds or --seed, not both")
    args.seeds = args.seeds or [0 if args.seed is None else args.seed]
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has duplicates: {args.seeds}")
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    known = {"maml", *PROTO_ROWS, *NPBML_ROWS}
    bad = [
        r
        for r in args.rows
        if base_row(r) not in known
        or (row_options(r) and base_row(r) not in NPBML_ROWS)
        or any("=" not in kv for kv in row_options(r))
    ]
    if bad:
        p.error(
            f"unknown row {bad[0]!r}; choose from {', '.join(sorted(known))}, or an NPBML row "
            f"with option overrides such as full{OPTION_SEP}head_init=proto"
        )
    if len(set(args.rows)) != len(args.rows):
        p.error(f"--rows has duplicates: {args.rows}")
    # References that are not rows of this run are dropped (the defaults may not apply).
    args.reference = [r for r in args.reference if r in args.rows]
    if args.lake and args.ways != 20:
        p.error("--lake scores Lake's 20-way runs: add --ways 20")
    return args


def check_same_data(args: argparse.Namespace) -> None:
    """Every row is tested on episodes drawn from ``--config``'s data section: the MAML config
    must describe the same data (else its learner would be scored on images it never saw)."""
    if "maml" not in args.rows:
        return
    import dataclasses

    from npbml.config import load_config

    ours, maml = (dataclasses.asdict(load_config(c).data) for c in (args.config, args.maml_config))
    diff = sorted(k for k in {**ours, **maml} if k != "ways" and ours.get(k) != maml.get(k))
    if diff:
        raise SystemExit(
            f"--maml-config {args.maml_config} and --config {args.config} differ in data."
            f"{', data.'.join(diff)}: the rows would not share test episodes; make the data "
            "sections equal"
        )


def render(args: argparse.Namespace) -> int:
    """``--render``: the Markdown section of a finished run (``OUT/results.json``), without
    training or evaluating anything again."""
    results = json.loads((Path(args.out) / "results.json").read_text())
    if args.command:
        results["command"] = args.command
    run_args = argparse.Namespace(**results["args"])
    run_args.label = args.label or run_args.label
    per_seed = {int(k): v for k, v in results["seeds"].items()}
    if not args.markdown:
        raise SystemExit("--render needs --markdown FILE (where to write the section)")
    write_markdown(Path(args.markdown), markdown(results, run_args, per_seed), run_args.label)
    return 0


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if args.render:
        return render(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Evaluation runs here, beside the training processes: one intra-op thread each.
    torch.set_num_threads(1)
    check_same_data(args)
    sampler = test_sampler(args)
    per_seed = {seed: run_seed(args, seed, sampler) for seed in args.seeds}
    results = {
        "command": " ".join(["python scripts/npbml_ablations.py", *(argv or sys.argv[1:])]),
        "args": vars(args),
        "test_episodes": {
            "tasks": args.tasks,
            "test_seed": args.test_seed,
            "within_alphabet": args.within_alphabet,
            "alphabets": sampler.alphabets,
            "classes": [sampler.sample(i).classes.tolist() for i in range(args.tasks)],
        },
        "seeds": {str(s): r for s, r in per_seed.items()},
    }
    results["summary"] = summarize(args, per_seed)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.markdown:
        write_markdown(Path(args.markdown), markdown(results, args, per_seed), args.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
