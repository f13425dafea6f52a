"""Two checkouts of the toolkit A/B in one process, interleaved (issue 13): before and after.

Separate processes on a shared 2-core VM drift by 10-20% between runs (docs/benchmarks.md), more
than most speed-ups; in one process the drift hits both arms alike. Each checkout's ``npbml``,
``tasks`` and ``bench_npbml`` modules are imported once and swapped into ``sys.modules`` before
each of its calls (so imports inside functions resolve to the right checkout). Per checkout the
feature-relation NPBML (``--variant npbml``: the image relation network) and MAML of
``scripts/bench_npbml.py`` (same settings, seeds and episodes) run their meta-step or their
test adaptation (16 tasks at once, per task), round-robin, the order of the checkouts
alternating every round; one thread, thread time, medians, and the medians of the per-round
ratios ("paired").

Usage (``git worktree add /tmp/base <rev>`` makes the "before" checkout):
    python scripts/bench_ab.py /tmp/base . --setting bench --what test --rounds 9
    python scripts/bench_ab.py /tmp/base . --setting demo --what step --out ab.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# scripts/ is on sys.path: run as a script, or by its test
from _report import paired_ratio, write_json

OWN = ("npbml", "tasks", "bench_npbml")


def _drop_own_modules() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in OWN]:
        del sys.modules[name]


def load(
    checkout: Path, setting: str, variant: str = "npbml-frel"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Import ``checkout``'s modules; returns them and its learners and episodes."""
    import torch

    _drop_own_modules()
    paths = [str(checkout), str(checkout / "scripts")]
    sys.path[:0] = paths
    try:
        import bench_npbml as bench

        from tasks.episode import Episode

        s = bench.SETTINGS[setting]
        arms = {
            "npbml": bench.build(variant, s),
            "maml": bench.build("maml", s),
            "test": bench._batch(torch, Episode, 5, s["test_queries"], bench.TEST_GROUP, 1),
            "train": bench._batch(torch, Episode, 5, s["queries"], s["meta_batch"], 0),
        }
    finally:
        del sys.path[: len(paths)]
    return {m: v for m, v in sys.modules.items() if m.split(".")[0] in OWN}, arms


def _call(arms: dict[str, Any], who: str, what: str) -> float:
    """Thread seconds of one call, per task for a test pass."""
    learner = arms[who]
    t = time.thread_time()
    if what == "test":
        learner.evaluate(arms["test"])
        return (time.thread_time() - t) / len(arms["test"].support_x)
    for p in learner.meta_parameters():
        p.grad = None
    learner.meta_backward(arms["train"], workers=1)
    return time.thread_time() - t


def run(
    checkouts: dict[str, Path],
    setting: str,
    what: str,
    rounds: int,
    variant: str = "npbml-frel",
) -> dict[str, Any]:
    """Medians (milliseconds) per checkout and learner, and the ratios; ``sys.modules`` is
    left as it was found."""
    original = {m: v for m, v in sys.modules.items() if m.split(".")[0] in OWN}
    try:
        return _interleaved(checkouts, setting, what, rounds, variant)
    finally:
        _drop_own_modules()
        sys.modules.update(original)


def _interleaved(
    checkouts: dict[str, Path], setting: str, what: str, rounds: int, variant: str
) -> dict[str, Any]:
    loaded = {name: load(path, setting, variant) for name, path in checkouts.items()}
    times: dict[str, list[float]] = {f"{n}:{w}": [] for n in loaded for w in ("npbml", "maml")}
    names = list(loaded)
    for r in range(rounds + 1):  # round 0 warms up
        for name in names if r % 2 else names[::-1]:
            modules, arms = loaded[name]
            _drop_own_modules()
            sys.modules.update(modules)
            for who in ("npbml", "maml"):
                t = _call(arms, who, what)
                if r:
                    times[f"{name}:{who}"].append(1e3 * t)
    ms = {k: statistics.median(v) for k, v in times.items()}
    a, b = names

    def paired(x: str, y: str) -> float:
        return paired_ratio(times[x], times[y])

    return {
        "ms": ms,
        "npbml_over_maml": {n: ms[f"{n}:npbml"] / ms[f"{n}:maml"] for n in names},
        f"npbml_{b}_over_{a}": ms[f"{b}:npbml"] / ms[f"{a}:npbml"],
        f"maml_{b}_over_{a}": ms[f"{b}:maml"] / ms[f"{a}:maml"],
        "paired": {
            **{f"npbml_over_maml:{n}": paired(f"{n}:npbml", f"{n}:maml") for n in names},
            f"npbml_{b}_over_{a}": paired(f"{b}:npbml", f"{a}:npbml"),
            f"maml_{b}_over_{a}": paired(f"{b}:maml", f"{a}:maml"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("before", type=Path, help="checkout A (e.g. a worktree of the old commit)")
    ap.add_argument("after", type=Path, help="checkout B")
    ap.add_argument("--setting", choices=["demo", "bench"], default="bench")
    ap.add_argument("--what", choices=["test", "step"], default="test")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--variant",
        choices=["npbml-frel", "npbml"],
        default="npbml-frel",
        help="the NPBML of bench_npbml.py: feature relation (default) or image relation",
    )
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    import torch

    torch.set_num_threads(1)
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    result = {
        "torch": torch.__version__,
        "setting": args.setting,
        "what": args.what,
        "rounds": args.rounds,
        "variant": args.variant,
        **run(checkouts, args.setting, args.what, args.rounds, args.variant),
    }
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
