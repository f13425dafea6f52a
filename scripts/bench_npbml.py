"""NPBML's meta-step and test-time adaptation against MAML's, side by side (issue 13).

Two settings, both one torch thread, synthetic 28x28x1 inputs (the cost does not depend on the
pixels), 5-way 1-shot:

- ``demo``: the demo's shapes (``configs/demo.yaml`` / ``configs/npbml_demo.yaml``): Conv4-32
  max-pool, 5 queries per class at meta-training and 15 at test, meta-batch 4. MAML: all layers,
  lr 0.4, 1 second-order inner step (3 at test). NPBML: its defaults (blocks 0-2 frozen, last
  block + FiLM + head adapted, warp, CE + L_S + L_Q + R, 5 Nesterov steps), relation network of
  the backbone's width (32), as the demo pre-trains it.
- ``bench``: the NPBML row of ``scripts/bench_step.py --against learn2learn``: Conv4-64 strided,
  15 queries per class, meta-batch 16, relation network width 64.

Variants: ``maml`` and ``maml-cl`` (MAML channels-last, :mod:`npbml.layout`), ``npbml`` (the
image relation network) and ``npbml-frel`` (the relation network on the backbone's frozen
features, ``RelationNetwork(reads="features")``: NPBML's cost without a second encoder). Each
meta-step is ``zero_grad`` + ``learner.meta_backward(batch, workers=1)`` (one thread; NPBML's
tasks go through its batched inner loop, :mod:`npbml.algorithms.npbml.batched`). Test time is
``learner.evaluate`` on 16 test-shaped tasks at once, per task (what ``npbml eval`` hands NPBML,
``NPBML.evaluation_batch``; MAML adapts them one by one either way), and on one task alone.
Timing: thread CPU time (``time.thread_time``) and wall time of every call, the variants
interleaved round-robin (order rotated every round) after ``--warmup`` calls each, so that load
from other jobs hits all alike; the table gives medians and the ratios NPBML / MAML (and against
the faster MAML layout). NPBML runs without its episode cache: the timed calls repeat the same
episodes, which a test pass never does.

``--repo DIR`` imports ``npbml`` from another checkout (e.g. a worktree of an older commit), to
measure "before" and "after" with the same script.

Usage:
    python scripts/bench_npbml.py                                # both settings, JSON to stdout
    python scripts/bench_npbml.py --out docs/bench_npbml.json --markdown docs/benchmarks.md
    python scripts/bench_npbml.py --repo /path/to/old/checkout --setting demo --json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from _report import paired_ratio  # scripts/ is on sys.path: run as a script, or imported

REPO = Path(__file__).resolve().parents[1]
MD_START, MD_END = "<!-- bench_npbml:start -->", "<!-- bench_npbml:end -->"

SETTINGS: dict[str, dict[str, Any]] = {
    "demo": dict(hidden=32, variant="maxpool", queries=5, test_queries=15, meta_batch=4),
    "bench": dict(hidden=64, variant="strided", queries=15, test_queries=15, meta_batch=16),
}
VARIANTS = ("maml", "maml-cl", "npbml", "npbml-frel")
NPBML_VARIANTS = ("npbml", "npbml-frel")
TEST_GROUP = 16  # NPBML.evaluation_batch: the episodes `npbml eval` hands NPBML at once


def _batch(
    torch: Any, episode_cls: Any, ways: int, queries: int, meta_batch: int, seed: int
) -> Any:
    g = torch.Generator().manual_seed(seed)
    eps = []
    for _ in range(meta_batch):
        sy = torch.arange(ways)
        qy = torch.arange(ways).repeat_interleave(queries)
        eps.append(
            episode_cls(
                torch.rand(ways, 1, 28, 28, generator=g),
                sy,
                torch.rand(len(qy), 1, 28, 28, generator=g),
                qy,
                torch.arange(ways),
            )
        )
    return episode_cls.stack(eps)


def build(variant: str, setting: dict[str, Any], ways: int = 5) -> Any:
    """The learner of one variant (seeded: every run builds the same weights)."""
    import torch

    from npbml.algorithms import MAML, NPBML
    from npbml.algorithms.npbml.layers.relation import RelationNetwork
    from npbml.models import Conv4

    torch.manual_seed(0)
    model = Conv4(1, ways, hidden=setting["hidden"], image_size=28, variant=setting["variant"])
    if variant == "npbml":
        relation = RelationNetwork(channels=setting["hidden"], in_channels=1)
        return NPBML(model, relation_net=relation, episode_cache=0)
    if variant == "npbml-frel":
        blocks = len(model.blocks) - 1  # NPBML's default frozen blocks
        relation = RelationNetwork(
            channels=setting["hidden"], reads="features", feature_blocks=blocks
        )
        return NPBML(model, relation_net=relation, episode_cache=0)
    return MAML(
        model,
        inner_lr=0.4,
        inner_steps=1,
        eval_inner_steps=3,
        channels_last=variant == "maml-cl",
    )


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    t, w = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - t, time.perf_counter() - w


def anil_headroom(s: dict[str, Any], train: Any, rounds: int) -> dict[str, float]:
    """ANIL's meta-step (5 head-only steps, second order) against its floor: the body's forward
    and backward on the same support and query images, which no task batching can remove. The
    gap bounds what batching ANIL's inner loops could save."""
    import torch

    from npbml.algorithms import ANIL
    from npbml.models import Conv4

    torch.manual_seed(0)
    model = Conv4(1, 5, hidden=s["hidden"], image_size=28, variant=s["variant"])
    anil = ANIL(model, inner_lr=0.4, inner_steps=5)
    tasks = train.unstack()

    def step() -> None:
        for p in anil.meta_parameters():
            p.grad = None
        anil.meta_backward(train, workers=1)

    def floor() -> None:
        for p in anil.meta_parameters():
            p.grad = None
        total = sum(model(t.query_x).sum() + model.features(t.support_x).sum() for t in tasks)
        cast(torch.Tensor, total).backward()

    step()
    floor()
    times: dict[str, list[float]] = {"step": [], "floor": []}
    for _ in range(rounds):
        times["step"].append(_timed(step)[0])
        times["floor"].append(_timed(floor)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"step_s": med["step"], "floor_s": med["floor"], "ratio": med["step"] / med["floor"]}


def test_floor(learner: Any, maml: Any, test: Any, rounds: int) -> dict[str, float]:
    """Per test task: NPBML's episode-level no-grad work (the frozen blocks on ``[S; Q]`` and
    on ``Q`` alone, and the relation scores), which no inner-loop speed-up removes, and MAML's
    query forward, against both methods' whole test adaptation."""
    import torch

    tasks = test.unstack()

    @torch.no_grad()
    def floor() -> None:
        for t in tasks:
            h = learner.frozen_features(torch.cat([t.support_x, t.query_x]))
            learner.relation_scores(t.support_x, t.support_y, t.query_x, h)
            learner.frozen_features(t.query_x)

    @torch.no_grad()
    def query_forward() -> None:
        for t in tasks:
            maml.model(t.query_x)

    calls = {
        "npbml_floor": floor,
        "maml_query_forward": query_forward,
        "npbml_test": lambda: learner.evaluate(test),
        "maml_test": lambda: maml.evaluate(test),
    }
    for f in calls.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            times[k].append(_timed(f)[0] / len(tasks))
    return {f"{k}_s": statistics.median(v) for k, v in times.items()}


def step_phases(learners: dict[str, Any], train: Any, rounds: int) -> dict[str, Any]:
    """Where the feature-relation NPBML meta-step goes: the episode-level no-grad work, the
    forward of the batched 5-step second-order loop (with it), the whole step; and the aten
    operations one step issues, NPBML's against MAML's (the issue counted 124k against 8.8k)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from npbml.algorithms.npbml.batched import batched_query_logits

    learner, tasks = learners["npbml-frel"], train.unstack()

    @torch.no_grad()
    def episode_work() -> None:
        for t in tasks:
            learner.inner_inputs(t.support_x, "second", t.support_y, t.query_x)
            learner.query_features(t.query_x)

    def inner_forward() -> None:
        batched_query_logits(learner, tasks, learner.inner_steps, "second")

    def step(v: str) -> Callable[[], None]:
        def run() -> None:
            for p in learners[v].meta_parameters():
                p.grad = None
            learners[v].meta_backward(train, workers=1)

        return run

    calls = {
        "episode_work": episode_work,
        "inner_forward": inner_forward,
        "step": step("npbml-frel"),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            times[k].append(_timed(f)[0])
    out: dict[str, Any] = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    for v in ("maml", "npbml-frel"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(v)()
        out[f"aten_ops_{v}"] = sum(
            e.count for e in prof.key_averages() if e.key.startswith("aten::")
        )
    return out


def run_setting(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved meta-step and test-time timings of every variant in one setting."""
    import torch

    from tasks.episode import Episode

    s = SETTINGS[name]
    train = _batch(torch, Episode, args.ways, s["queries"], s["meta_batch"], 0)
    test = _batch(torch, Episode, args.ways, s["test_queries"], TEST_GROUP, 1)
    one = test.unstack()[0]
    learners = {v: build(v, s, args.ways) for v in VARIANTS}

    def step(v: str) -> Callable[[], Any]:
        learner = learners[v]

        def run() -> None:
            for p in learner.meta_parameters():
                p.grad = None
            learner.meta_backward(train, workers=1)

        return run

    def evaluate(v: str) -> Callable[[], Any]:
        return lambda: learners[v].evaluate(test)

    def evaluate_one(v: str) -> Callable[[], Any]:
        return lambda: learners[v].evaluate(one)

    out: dict[str, Any] = {"setting": {"name": name, "ways": args.ways, "shots": 1, **s}}
    phases = (
        ("meta_step", step, 1),
        ("test_time", evaluate, TEST_GROUP),
        ("test_time_single", evaluate_one, 1),
    )
    for kind, make, per in phases:
        for v in VARIANTS:
            for _ in range(args.warmup):
                make(v)()
        times: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        for r in range(args.steps):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                times[v].append(_timed(make(v)))
        out[kind] = {
            v: {
                "thread_s": statistics.median(t for t, _ in ts) / per,
                "wall_s": statistics.median(w for _, w in ts) / per,
            }
            for v, ts in times.items()
        }
        res = out[kind]
        best = min(res["maml"]["thread_s"], res["maml-cl"]["thread_s"])
        for v in NPBML_VARIANTS:
            tag = "" if v == "npbml" else "_frel"
            res[f"ratio_thread{tag}"] = res[v]["thread_s"] / res["maml"]["thread_s"]
            # the median of each round's ratio: drift between rounds cancels (bench_ab.py)
            res[f"ratio_thread_paired{tag}"] = paired_ratio(
                [t for t, _ in times[v]], [t for t, _ in times["maml"]]
            )
            res[f"ratio_wall{tag}"] = res[v]["wall_s"] / res["maml"]["wall_s"]
            res[f"ratio_thread_vs_best_maml{tag}"] = res[v]["thread_s"] / best
    out["anil"] = anil_headroom(s, train, args.steps)
    out["test_floor"] = test_floor(learners["npbml-frel"], learners["maml"], test, args.steps)
    out["phases"] = step_phases(learners, train, args.steps)
    return out


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        MD_START,
        "## NPBML vs MAML: meta-step and test-time adaptation (issue 13)",
        "",
        f"Command: `{command}` ({result['date']}, torch {result['torch']}, one thread, "
        f"{result['steps']} interleaved rounds after {result['warmup']} warm-up).",
        "",
        "NPBML: the image relation network (Sung et al.'s own encoder); NPBML-f: the relation "
        "network on the backbone's frozen features. Ratios: thread time against MAML's, of the "
        "medians (against the faster MAML layout in brackets) and paired (the median of each "
        "round's ratio, in which drift between rounds cancels).",
        "",
        "| setting | what | MAML ms | MAML-cl ms | NPBML ms | NPBML-f ms | NPBML / MAML | "
        "NPBML-f / MAML | NPBML / MAML paired | NPBML-f / MAML paired | NPBML-f / MAML (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["settings"].items():
        for kind, label in (
            ("meta_step", "meta-step"),
            ("test_time", f"test adaptation per task ({TEST_GROUP} at once, as `npbml eval`)"),
            ("test_time_single", "test adaptation, one task alone"),
        ):
            x = r[kind]
            ms = " | ".join(f"{1e3 * x[v]['thread_s']:.1f}" for v in VARIANTS)
            lines.append(
                f"| {name} | {label} | {ms} | {x['ratio_thread']:.2f}x "
                f"({x['ratio_thread_vs_best_maml']:.2f}x) | {x['ratio_thread_frel']:.2f}x "
                f"({x['ratio_thread_vs_best_maml_frel']:.2f}x) | {x['ratio_thread_paired']:.2f}x | "
                f"{x['ratio_thread_paired_frel']:.2f}x | {x['ratio_wall_frel']:.2f}x |"
            )
    settings = result["settings"].items()
    lines += _table(
        "ANIL (head-only inner loop, 5 second-order steps) against its floor, the body's forward "
        "and backward on the same images: task batching could save at most the difference.",
        ["setting", "ANIL meta-step ms", "floor ms", "ratio"],
        [
            [n, f"{1e3 * a['step_s']:.1f}", f"{1e3 * a['floor_s']:.1f}", f"{a['ratio']:.2f}x"]
            for n, a in ((n, r["anil"]) for n, r in settings)
        ],
    )
    lines += _table(
        "NPBML's test-time floor (relation on features): per task, the frozen blocks on [S; Q] "
        "and on Q alone plus the relation scores, no grad; MAML's query forward; both whole "
        "test adaptations (16 tasks at once).",
        [
            "setting",
            "NPBML floor ms",
            "NPBML test ms",
            "MAML query forward ms",
            "MAML test ms",
            "floor / MAML test",
        ],
        [
            [
                n,
                *(
                    f"{1e3 * f[k]:.1f}"
                    for k in (
                        "npbml_floor_s",
                        "npbml_test_s",
                        "maml_query_forward_s",
                        "maml_test_s",
                    )
                ),
                f"{f['npbml_floor_s'] / f['maml_test_s']:.2f}x",
            ]
            for n, f in ((n, r["test_floor"]) for n, r in settings)
        ],
    )
    lines += _table(
        "The feature-relation NPBML meta-step by phase (thread ms; the inner loop's forward "
        "includes the episode work) and the aten operations of one meta-step.",
        [
            "setting",
            "episode work",
            "5-step loop forward",
            "whole step",
            "aten ops NPBML-f",
            "aten ops MAML",
        ],
        [
            [
                n,
                *(f"{1e3 * ph[k]:.0f}" for k in ("episode_work_s", "inner_forward_s", "step_s")),
                str(ph["aten_ops_npbml-frel"]),
                str(ph["aten_ops_maml"]),
            ]
            for n, ph in ((n, r["phases"]) for n, r in settings)
        ],
    )
    lines += ["", MD_END]
    return "\n".join(lines)


def _table(caption: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A captioned Markdown table, preceded by a blank line."""
    out = ["", caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def update_markdown(path: Path, section: str) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from _markdown import update_section

    update_section(path, section, MD_START, MD_END)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--setting", choices=[*SETTINGS, "both"], default="both")
    p.add_argument("--steps", type=int, default=7, help="timed rounds per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--repo", default=None, help="import npbml from this checkout instead")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--markdown", default=None, help="update this file's bench_npbml section")
    p.add_argument("--json", action="store_true", help="print the JSON")
    args = p.parse_args(argv)
    if min(args.steps, args.ways - 1) < 1 or args.warmup < 0:
        p.error("--steps must be >= 1, --ways >= 2, --warmup >= 0")
    sys.path.insert(0, str(Path(args.repo).resolve() if args.repo else REPO))
    import torch

    import npbml

    torch.set_num_threads(1)
    names = list(SETTINGS) if args.setting == "both" else [args.setting]
    result = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "npbml": str(Path(npbml.__file__).parent),
        "steps": args.steps,
        "warmup": args.warmup,
        "settings": {n: run_setting(n, args) for n in names},
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.markdown:
        command = "python scripts/bench_npbml.py " + " ".join(argv or sys.argv[1:])
        update_markdown(Path(args.markdown), markdown(result, command.strip()))
    if args.json or not (args.out or args.markdown):
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
