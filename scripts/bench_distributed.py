"""Meta-training throughput with 1 process vs P processes (torchrun, gloo on CPU).

Setting: the demo's MAML (``configs/demo.yaml``: glyphs 5-way 1-shot, 5 queries per class,
Conv4 with 32 filters and max-pooling, one second-order inner step with alpha 0.4, Adam outer
step), meta-batch ``--meta-batch`` (default 8), one torch thread per process (``train.threads:
1``, ``OMP_NUM_THREADS=1``). Each configuration is a real ``npbml train`` command:

- 1 process: ``python -m npbml train --config FILE --out DIR``;
- P processes: ``python -m torch.distributed.run --standalone --nproc_per_node=P -m npbml train
  ...`` (each rank computes ``B/P`` tasks; one gradient all-reduce per step).

Throughput is read off rank 0's ``metrics.jsonl`` (``log_every: 1``; its ``time_s`` is the
training time since the loop started, validation and checkpoints excluded): meta-iterations/s
``= (s_end - s_0) / (time_s(s_end) - time_s(s_0))`` over the steps after ``--warmup`` warm-up
steps, and tasks/s ``= B *`` meta-iterations/s. Rank 0's clock includes waiting for the other
ranks in the all-reduce, so this is the group's rate. The runs alternate (1, P, 1, P, ...) for
``--repeats`` rounds so that load from other jobs on a shared machine hits both alike; the table
gives the median and the range, plus the per-round paired ratio. Everything outside the timed
steps (start-up, rendezvous, warm-up steps, final validation and checkpoint) is reported
separately (``wall_s`` minus ``train_s``) and not counted.

Usage:
    python scripts/bench_distributed.py                          # writes docs/bench_distributed.json
    python scripts/bench_distributed.py --markdown docs/benchmarks.md   # and its section there
    python scripts/bench_distributed.py --from-json docs/bench_distributed.json --markdown docs/benchmarks.md
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
MD_START, MD_END = "<!-- bench_distributed:start -->", "<!-- bench_distributed:end -->"


def _config_overrides(args: argparse.Namespace) -> list[str]:
    steps = args.warmup + args.steps
    return [
        f"train.meta_batch_size={args.meta_batch}",
        f"train.meta_steps={steps}",
        "train.log_every=1",
        f"train.val_every={steps}",  # one validation, after the last timed step
        "train.val_tasks=2",
        f"train.checkpoint_every={steps}",
        "train.threads=1",
        "train.device=cpu",
    ]


def run_once(args: argparse.Namespace, procs: int, out: Path) -> dict[str, Any]:
    """One ``npbml train`` run with ``procs`` processes; its throughput from metrics.jsonl."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    train = ["-m", "npbml", "train", "--config", str(args.config), "--out", str(out)]
    train += ["--no-resume", "--quiet"]
    for o in _config_overrides(args):
        train += ["--set", o]
    if procs == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={procs}", *train]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    records = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line
    ]
    train_recs = {r["step"]: r for r in records if r["split"] == "train" and "time_s" in r}
    s0, s1 = args.warmup, args.warmup + args.steps
    dt = train_recs[s1]["time_s"] - train_recs[s0]["time_s"]
    its = (s1 - s0) / dt
    return {
        "procs": procs,
        "meta_it_per_s": its,
        "tasks_per_s": its * args.meta_batch,
        "train_s": dt,
        "wall_s": wall,
        "final_loss": train_recs[s1].get("loss"),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    load_start = os.getloadavg()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        for r in range(args.repeats):
            order = args.procs if r % 2 == 0 else list(reversed(args.procs))
            for p in order:
                res = run_once(args, p, Path(tmp) / f"p{p}_r{r}")
                res["round"] = r
                runs.append(res)
                print(
                    f"round {r} procs {p}: {res['meta_it_per_s']:.3f} it/s, "
                    f"{res['tasks_per_s']:.2f} tasks/s (wall {res['wall_s']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    summary = []
    for p in args.procs:
        its = [x["meta_it_per_s"] for x in runs if x["procs"] == p]
        startup = [x["wall_s"] - x["train_s"] for x in runs if x["procs"] == p]
        summary.append(
            {
                "procs": p,
                "tasks_per_proc": args.meta_batch // p,
                "meta_it_per_s_median": statistics.median(its),
                "meta_it_per_s_min": min(its),
                "meta_it_per_s_max": max(its),
                "tasks_per_s_median": statistics.median(its) * args.meta_batch,
                "overhead_s_median": statistics.median(startup),
            }
        )
    base = summary[0]["meta_it_per_s_median"]
    for s in summary:
        s["speedup"] = s["meta_it_per_s_median"] / base
    return {
        "setting": {
            "config": str(Path(args.config).relative_to(ROOT))
            if Path(args.config).resolve().is_relative_to(ROOT)
            else str(args.config),
            "overrides": _config_overrides(args),
            "meta_batch": args.meta_batch,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "repeats": args.repeats,
            "backend": "gloo",
            "threads_per_process": 1,
        },
        "machine": {
            "platform": platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "summary": summary,
        "runs": runs,
    }


def to_markdown(result: dict[str, Any]) -> str:
    s, m = result["setting"], result["machine"]
    rows = [
        "| processes | tasks per process | meta-iterations/s (median) | range | tasks/s | "
        "speed-up | outside timed steps (s) |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for x in result["summary"]:
        rows.append(
            f"| {x['procs']} | {x['tasks_per_proc']} | {x['meta_it_per_s_median']:.3f} | "
            f"{x['meta_it_per_s_min']:.3f}-{x['meta_it_per_s_max']:.3f} | "
            f"{x['tasks_per_s_median']:.2f} | {x['speedup']:.2f}x | "
            f"{x['overhead_s_median']:.1f} |"
        )
    paired = _paired_ratios(result)
    la, le = m["load_average_start"], m["load_average_end"]
    procs = [x["procs"] for x in result["summary"]]
    return "\n".join(
        [
            MD_START,
            "## Multi-process meta-training (torchrun, gloo)",
            "",
            f"Setting: `{s['config']}` (MAML, glyphs 5-way 1-shot, 5 queries/class, Conv4-32 "
            f"max-pool, 1 second-order inner step, Adam), meta-batch {s['meta_batch']} split "
            f"evenly across the processes, {s['threads_per_process']} torch thread per process, "
            f"backend {s['backend']}. Each row is the real `npbml train` command (P > 1: "
            "`torchrun --standalone --nproc_per_node=P -m npbml train ...`); throughput over "
            f"{s['timed_steps']} meta-iterations after {s['warmup_steps']} warm-up ones, from rank "
            f"0's `metrics.jsonl` clock (validation, checkpoints and start-up excluded), median of "
            f"{s['repeats']} runs per row, alternating {' / '.join(map(str, procs))} processes.",
            "",
            f"Command: `python scripts/bench_distributed.py --meta-batch {s['meta_batch']} "
            f"--steps {s['timed_steps']} --warmup {s['warmup_steps']} --repeats {s['repeats']} "
            "--markdown docs/benchmarks.md` (raw numbers: `docs/bench_distributed.json`).",
            "",
            f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}; load average "
            f"{la[0]:.1f}, {la[1]:.1f}, {la[2]:.1f} at the start and {le[0]:.1f}, {le[1]:.1f}, "
            f"{le[2]:.1f} at the end (the machine is shared with other jobs: absolute rates are "
            "noisy; the rows were interleaved so that the load hit them alike).",
            "",
            *rows,
            "",
            "Paired speed-up (P-process rate / 1-process rate within each round, the two runs "
            "back to back): "
            + "; ".join(
                f"P={p}: median {statistics.median(r):.2f}x, rounds "
                + ", ".join(f"{x:.2f}" for x in r)
                for p, r in paired.items()
            )
            + ".",
            "",
            _reading(result),
            MD_END,
        ]
    )


def _paired_ratios(result: dict[str, Any]) -> dict[int, list[float]]:
    """Per round, each process count's rate over the 1-process rate of the same round."""
    by_round: dict[int, dict[int, float]] = {}
    for x in result["runs"]:
        by_round.setdefault(x["round"], {})[x["procs"]] = x["meta_it_per_s"]
    procs = [x["procs"] for x in result["summary"] if x["procs"] != 1]
    return {
        p: [r[p] / r[1] for _, r in sorted(by_round.items()) if p in r and 1 in r] for p in procs
    }


def _reading(result: dict[str, Any]) -> str:
    summ = result["summary"]
    cpus = result["machine"]["cpus"]
    la = result["machine"]["load_average_start"][0]
    parts = [
        f"{x['procs']} processes: {x['speedup']:.2f}x the single-process rate" for x in summ[1:]
    ]
    return (
        f"Reading: {'; '.join(parts)}, on a {cpus}-core machine whose 1-minute load average was "
        f"{la:.1f} before the first run (other jobs were using the cores at the same time, so a "
        "process rarely had a core to itself). Each rank computes 1/P of the tasks, which is "
        "nearly all of a MAML step, and adds one all-reduce of the meta-gradient (one float per "
        "meta-parameter, ~0.1 MB here, over local sockets; not timed separately) and one of "
        "three metrics per step, which should be small next to a step of 0.5-1 s, so the "
        "speed-up is bounded by how much of a second core the processes get. The last column is "
        "the wall time outside the timed steps (process start-up, generating the glyph family "
        "and importing torch in every process, the rendezvous, the warm-up steps, the final "
        "validation and checkpoint, exit); it is larger with 2 processes because both build the "
        "glyph family on the same 2 busy cores, and it is excluded from the rates."
    )


def update_markdown(path: Path, section: str) -> None:
    """Replace this script's marked section of ``path`` (appended at the end when absent),
    re-reading the file just before writing: other scripts own the other sections."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MD_START in text and MD_END in text:
        before, rest = text.split(MD_START, 1)
        after = rest.split(MD_END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed meta-iterations per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="runs per process count")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json-out", default=str(ROOT / "docs" / "bench_distributed.json"))
    p.add_argument("--markdown", default=None, help="update this Markdown file's section")
    p.add_argument("--from-json", default=None, help="only re-render --markdown from a JSON")
    args = p.parse_args(argv)
    if args.from_json:
        if not args.markdown:
            p.error("--from-json needs --markdown")
        update_markdown(
            Path(args.markdown), to_markdown(json.loads(Path(args.from_json).read_text()))
        )
        return 0
    if args.procs[0] != 1:
        p.error("--procs must start with 1 (the baseline)")
    for n in args.procs:
        if args.meta_batch % n:
            p.error(f"--meta-batch {args.meta_batch} is not divisible by {n} processes")
    result = measure(args)
    Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    if args.markdown:
        update_markdown(Path(args.markdown), to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
