"""MAML vs NPBML and its ablation rows (paper Tables 3-4) under one budget, on one CPU box.

Pipeline: pre-train the backbone and the relation network once (shared by every NPBML row),
meta-train every row for the same number of meta-steps and meta-batch size (the same number of
training tasks), then test each best-validation checkpoint on the same fixed test episodes
(``--tasks``, default 600) and, when ``--lake PATH`` is given, on Lake et al.'s 20-way one-shot
runs. Rows run as separate ``npbml`` processes, ``--workers`` at a time (one torch thread each).
Writes ``OUT/results.json`` and, with ``--markdown FILE``, a table between markers in FILE.

    python scripts/npbml_ablations.py --out runs/ablations --markdown docs/results.md
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

ROOT = Path(__file__).resolve().parents[1]
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


def run_row(row: str, args: argparse.Namespace, common: list[str]) -> dict[str, Any]:
    name = "maml" if row == "maml" else row.replace(":", "_").replace("+", "plus_")
    out = Path(args.out) / name
    log = Path(args.out) / f"{name}.log"
    config = args.maml_config if row == "maml" else args.config
    sets = list(common)
    if row != "maml":
        sets += [f"algorithm.options.ablation={row}"]
    t0 = time.perf_counter()
    train_args = ["train", "--config", config, "--out", str(out), "--quiet"]
    for s in sets:
        train_args += ["--set", s]
    npbml(*train_args, log=log)
    train_s = time.perf_counter() - t0
    res = json.loads(
        npbml("eval", "--checkpoint", str(out), "--tasks", str(args.tasks), "--json", log=log)
    )
    vals = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"validation"' in line
    ]
    best_val = max((v["accuracy"] for v in vals), default=float("nan"))
    row_res = {"row": row, "train_s": round(train_s, 1), "best_val_accuracy": best_val, **res}
    if args.lake:
        lake = json.loads(
            npbml("eval-lake", "--checkpoint", str(out), "--runs", args.lake, "--json", log=log)
        )
        row_res["lake"] = lake
    print(json.dumps(row_res), flush=True)
    return row_res


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, pre: dict[str, Any]) -> str:
    cmd = " ".join(["python scripts/npbml_ablations.py", *sys.argv[1:]])
    start, end = markers(args.label)
    lr = f", meta-lr {args.meta_lr:g}" if args.meta_lr else ""
    title = f"NPBML ablations on Omniglot minimal ({args.ways}-way 1-shot, CPU"
    title += f", {args.label})" if args.label else ")"
    lines = [
        start,
        f"## {title}",
        "",
        f"Command: `{cmd}`  ",
        f"Seed {args.seed}; {args.meta_steps} meta-steps x meta-batch {args.meta_batch} for every "
        f"row{lr}; test: {args.tasks} fixed {args.ways}-way 1-shot episodes (15 queries per class) "
        "of the background_small2 characters not in small1; mean accuracy +- 95% interval "
        "(1.96 s / sqrt(n)). NPBML rows share one pre-trained backbone "
        f"({pre.get('backbone', '')}) and relation network ({pre.get('relation', '')}); the MAML "
        "row is plain MAML from scratch (configs/omniglot_minimal.yaml settings).",
        "",
        "| row | test accuracy (%) | 95% CI | best val (%) | train time (s) |"
        + (" Lake error (%) |" if args.lake else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if args.lake else ""),
    ]
    for r in results:
        line = (
            f"| {r['row']} | {100 * r['accuracy']:.2f} | {100 * r['ci95']:.2f} | "
            f"{100 * (r.get('best_val_accuracy') or float('nan')):.2f} | {r['train_s']:.0f} |"
        )
        if args.lake:
            line += f" {100 * r['lake']['error_rate']:.2f} |"
        lines.append(line)
    lines.append(end)
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, block: str, label: str) -> None:
    start, end = markers(label)
    text = path.read_text() if path.exists() else "# Results\n\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--config", default="configs/npbml_omniglot_minimal.yaml")
    p.add_argument("--maml-config", default="configs/omniglot_minimal.yaml")
    p.add_argument("--out", default="runs/npbml_ablations")
    p.add_argument("--rows", nargs="+", default=["maml", *NPBML_ROWS])
    p.add_argument("--meta-steps", type=int, default=300)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--relation-steps", type=int, default=300)
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--meta-lr", type=float, default=None, help="override train.meta_lr")
    p.add_argument("--label", default="", help="names this run's Markdown section")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ways", type=int, default=5, help="N-way (use 20 with --lake)")
    p.add_argument(
        "--lake", default=None, help="all_runs.zip or its folder (optional; needs --ways 20)"
    )
    p.add_argument("--markdown", default=None, help="update this Markdown file's section")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone, relation = out / "backbone.pt", out / "relation.pt"
    pre: dict[str, Any] = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        jobs = []
        if not backbone.exists():
            jobs.append(
                pool.submit(
                    npbml,
                    "pretrain",
                    "--config",
                    args.config,
                    "--out",
                    str(backbone),
                    "--steps",
                    str(args.pretrain_steps),
                    "--eval-every",
                    "200",
                    "--seed",
                    str(args.seed),
                    log=out / "pretrain.log",
                )
            )
        if not relation.exists():
            jobs.append(
                pool.submit(
                    npbml,
                    "pretrain-relation",
                    "--config",
                    args.config,
                    "--out",
                    str(relation),
                    "--channels",
                    "32",
                    "--steps",
                    str(args.relation_steps),
                    "--eval-every",
                    "100",
                    "--seed",
                    str(args.seed),
                    log=out / "pretrain_relation.log",
                )
            )
        for j in jobs:
            j.result()
    pre = {
        "backbone": f"{args.pretrain_steps} steps",
        "relation": f"{args.relation_steps} steps",
        "pretrain_s": round(time.perf_counter() - t0, 1),
    }
    common = [
        f"train.meta_steps={args.meta_steps}",
        f"train.meta_batch_size={args.meta_batch}",
        f"train.seed={args.seed}",
        *([f"train.meta_lr={args.meta_lr}"] if args.meta_lr else []),
        f"data.ways={args.ways}",
        f"algorithm.options.backbone_checkpoint={backbone.resolve()}",
        f"algorithm.options.relation_checkpoint={relation.resolve()}",
    ]
    maml_common = [c for c in common if not c.startswith("algorithm.")]
    with ThreadPoolExecutor(args.workers) as pool:
        futures = [
            pool.submit(run_row, row, args, maml_common if row == "maml" else common)
            for row in args.rows
        ]
        results = [f.result() for f in futures]
    summary = {"pretraining": pre, "args": vars(args), "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    if args.markdown:
        write_markdown(Path(args.markdown), markdown(results, args, pre), args.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
