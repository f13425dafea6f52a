"""NPBML with and without the once-unfolded adapted input (issue 13, :mod:`npbml.unfold`), A/B.

The feature-relation NPBML of ``scripts/bench_npbml.py`` (same settings, same weights) runs its
meta-step and its test adaptation (16 tasks at once) with ``learner.unfold_max_growth`` at
``--on`` and at 0 (never unfold), next to MAML's, interleaved round-robin in one process (one
thread, thread time, medians after one warm-up round). The demo setting's adapted conv has stride
1 (patches 9x the activation): ``--on 10`` there measures what the default limit (4) skips.

Usage:
    python scripts/bench_unfold.py --out docs/bench_unfold.json
    python scripts/bench_unfold.py --setting demo --on 10 --rounds 7
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_npbml  # noqa: E402  (the settings and builders of the main benchmark)


def _thread_time(fn: Callable[[], Any]) -> float:
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def run(setting: str, on: float, rounds: int) -> dict[str, Any]:
    """Medians (seconds) of the A/B in one setting."""
    import torch

    from tasks.episode import Episode

    s = bench_npbml.SETTINGS[setting]
    train = bench_npbml._batch(torch, Episode, 5, s["queries"], s["meta_batch"], 0)
    test = bench_npbml._batch(torch, Episode, 5, s["test_queries"], bench_npbml.TEST_GROUP, 1)
    npbml, maml = bench_npbml.build("npbml-frel", s), bench_npbml.build("maml", s)

    def with_limit(limit: float, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            npbml.unfold_max_growth = limit
            return fn()

        return call

    def step(learner: Any) -> Callable[[], Any]:
        def call() -> Any:
            for p in learner.meta_parameters():
                p.grad = None
            return learner.meta_backward(train, workers=1)

        return call

    calls = {
        "test_off": with_limit(0.0, lambda: npbml.evaluate(test)),
        "test_on": with_limit(on, lambda: npbml.evaluate(test)),
        "test_maml": lambda: maml.evaluate(test),
        "step_off": with_limit(0.0, step(npbml)),
        "step_on": with_limit(on, step(npbml)),
        "step_maml": step(maml),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(rounds + 1):
        for k, fn in calls.items():
            t = _thread_time(fn)
            if r:  # round 0 warms up
                times[k].append(t / (bench_npbml.TEST_GROUP if k.startswith("test") else 1))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--setting", choices=[*bench_npbml.SETTINGS, "both"], default="both")
    ap.add_argument("--on", type=float, default=4.0, help="unfold_max_growth of the 'on' runs")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    names = list(bench_npbml.SETTINGS) if args.setting == "both" else [args.setting]
    result = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "on": args.on,
        "rounds": args.rounds,
        "settings": {n: run(n, args.on, args.rounds) for n in names},
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
