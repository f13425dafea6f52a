"""One of NPBML's speed levers on and off, A/B (issue 13): the same math, two code paths.

The feature-relation NPBML of ``scripts/bench_npbml.py`` (same settings, same weights) runs its
meta-step and its test adaptation (16 tasks at once) with the lever on and off, next to MAML's,
interleaved round-robin in one process (one thread, thread time, medians after one warm-up round).
Levers (``--lever``):

- ``unfold``: the first adapted conv from patches unfolded once per episode
  (:mod:`npbml.algorithms.npbml.layers.unfold`): ``learner.unfold_max_growth`` at ``--on`` against 0
  (never). The demo
  setting's adapted conv has stride 1 (patches 9x the activation): ``--on 10`` there measures
  what the default limit (4) skips.
- ``warp``: the warp's convolution as one dense matrix product on maps smaller than its kernel
  (:func:`npbml.algorithms.npbml.layers.warp.warp_conv`) against ``F.conv2d``
  (``WarpLayer.dense_small_maps``).
- ``norm``: the adapted blocks' and warps' BatchNorm from reductions and elementwise operations
  (:func:`npbml.algorithms.npbml.layers.norm.batch_norm`, which keeps vmap's task dimension out of
  the channels) against PyTorch's BatchNorm forward (the modules' ``batch_norm`` swapped for a
  plain call).

Usage:
    python scripts/bench_levers.py --lever unfold --setting bench --out docs/bench_unfold.json
    python scripts/bench_levers.py --lever unfold --setting demo --on 10
    python scripts/bench_levers.py --lever warp --out docs/bench_warp.json
    python scripts/bench_levers.py --lever norm --out docs/bench_norm.json
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_npbml  # noqa: E402  (the settings and builders of the main benchmark)
from _report import write_json  # noqa: E402


def _thread_time(fn: Callable[[], Any]) -> float:
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def _switch(learner: Any, lever: str, on: float) -> Callable[[bool], None]:
    """``set(enabled)`` for one lever of ``learner``."""

    def unfold(enabled: bool) -> None:
        learner.unfold_max_growth = on if enabled else 0.0

    def warp(enabled: bool) -> None:
        for layer in learner.network.warps.values():
            layer.dense_small_maps = enabled

    def norm(enabled: bool) -> None:
        from npbml.algorithms.npbml.layers import film, norm, warp

        fn = norm.batch_norm if enabled else _plain_norm
        film.batch_norm = warp.batch_norm = fn  # type: ignore[attr-defined]

    return {"unfold": unfold, "warp": warp, "norm": norm}[lever]


def _plain_norm(bn: Any, z: Any) -> Any:
    return bn(z)


def run(setting: str, lever: str, on: float, rounds: int) -> dict[str, Any]:
    """Medians (seconds) of the A/B in one setting."""
    import torch

    from tasks.episode import Episode

    s = bench_npbml.SETTINGS[setting]
    train = bench_npbml._batch(torch, Episode, 5, s["queries"], s["meta_batch"], 0)
    test = bench_npbml._batch(torch, Episode, 5, s["test_queries"], bench_npbml.TEST_GROUP, 1)
    npbml, maml = bench_npbml.build("npbml-frel", s), bench_npbml.build("maml", s)

    switch = _switch(npbml, lever, on)

    def arm(enabled: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            switch(enabled)
            return fn()

        return call

    def step(learner: Any) -> Callable[[], Any]:
        def call() -> Any:
            for p in learner.meta_parameters():
                p.grad = None
            return learner.meta_backward(train, workers=1)

        return call

    calls = {
        "test_off": arm(False, lambda: npbml.evaluate(test)),
        "test_on": arm(True, lambda: npbml.evaluate(test)),
        "test_maml": lambda: maml.evaluate(test),
        "step_off": arm(False, step(npbml)),
        "step_on": arm(True, step(npbml)),
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
    ap.add_argument("--lever", choices=["unfold", "warp", "norm"], default="unfold")
    ap.add_argument("--on", type=float, default=4.0, help="unfold: unfold_max_growth when on")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    names = list(bench_npbml.SETTINGS) if args.setting == "both" else [args.setting]
    result = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "lever": args.lever,
        "on": args.on,
        "rounds": args.rounds,
        "settings": {n: run(n, args.lever, args.on, args.rounds) for n in names},
    }
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
