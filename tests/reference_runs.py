"""Tiny fit and meta-training runs whose outputs were recorded from the code before the
run-directory / training-loop / updater refactor (tests/data/reference_runs.json), so the tests
can assert that the refactor changed no number.

Regenerate (only when a change of numbers is intended): ``python tests/reference_runs.py``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "data" / "reference_runs.json"
TIMING = ("time", "tasks_per_s", "time_s", "eval_s")

# The fit settings recorded: one per loss kind and update rule.
FIT_LOSSES: dict[str, dict[str, Any]] = {
    "ce": {"name": "ce"},
    "label_smoothing": {"name": "label_smoothing", "smoothing": 0.2},
    "sparse_lsr": {"name": "sparse_lsr", "smoothing": 0.1},
    "ml3": {"name": "ml3", "offline_steps": 3},
    # Recorded with the papers' unbounded form, fit's AdaLFL default then (guard: false).
    "adalfl_next": {"name": "adalfl", "offline_steps": 2, "guard": False},
    "adalfl_validation": {"name": "adalfl", "meta_batch": "validation", "guard": False},
    "adalfl_same": {"name": "adalfl", "meta_batch": "same", "guard": False},
    "learned": {"name": "learned", "checkpoint": "{tmp}/learned.pt"},
    "evolved": {"name": "evolved", "checkpoint": "{tmp}/evolved.json"},
}


def blobs_npz(path: Path) -> str:
    """Three Gaussian blobs in 5-D (the same data as tests/test_fit.py's ``blobs``)."""
    g = np.random.default_rng(0)
    centres = g.normal(size=(3, 5)) * 3
    y = g.integers(0, 3, 300)
    x = centres[y] + g.normal(size=(300, 5)) * 0.5
    np.savez(path, x=x.astype(np.float32), y=y)
    return str(path)


def fit_config(npz: str, loss: dict[str, Any]) -> dict[str, Any]:
    return {
        "data": {"kind": "arrays", "path": npz},
        "model": {"name": "mlp", "hidden": [16]},
        "optim": {"lr": 0.05, "schedule": "cosine"},
        "loss": dict(loss),
        "train": {
            "epochs": 2,
            "batch_size": 32,
            "progress": False,
            "checkpoint_every": 4,
            "threads": 1,
        },
    }


# A conv bias followed by batch norm has a gradient that is zero in exact arithmetic (BN removes
# any constant shift), so its value after Adam's normalised steps is rounding noise amplified to
# the step size: it differs between CPUs and builds of the same torch and is not compared.
NOISE_KEYS = re.compile(r"conv\.bias$")


def assert_matches_recording(
    now: Any, recorded: Any, where: str = "", rel: float = 1e-4, abs_: float = 1e-6
) -> None:
    """Assert that ``now`` has the recording's structure, integers and strings exactly, and its
    floats to ``rel`` (relative) or ``abs_`` (absolute) tolerance.

    Exact float equality held only on the machine that recorded: another CPU or build of the
    same torch sums in another order (differences of 1e-8 to 1e-6 relative were seen in CI),
    while a change of the math moves these numbers by far more than the tolerance.
    """
    if isinstance(recorded, dict):
        assert isinstance(now, dict) and now.keys() == recorded.keys(), (
            f"{where}: keys {sorted(now)} != recorded {sorted(recorded)}"
        )
        for key, value in recorded.items():
            if NOISE_KEYS.search(str(key)):
                continue
            assert_matches_recording(now[key], value, f"{where}/{key}", rel, abs_)
    elif isinstance(recorded, list):
        assert isinstance(now, list) and len(now) == len(recorded), f"{where}: length differs"
        for i, (a, b) in enumerate(zip(now, recorded, strict=True)):
            assert_matches_recording(a, b, f"{where}[{i}]", rel, abs_)
    elif isinstance(recorded, float) and not isinstance(now, bool):
        assert isinstance(now, int | float), f"{where}: {now!r} is not a number"
        assert math.isclose(now, recorded, rel_tol=rel, abs_tol=abs_), (
            f"{where}: {now!r} != recorded {recorded!r}"
        )
    else:
        assert now == recorded and type(now) is type(recorded), f"{where}: {now!r} != {recorded!r}"


def _strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _param_sums(state: dict[str, torch.Tensor]) -> dict[str, float]:
    # Sums in float64 of every tensor: a change in any weight shows up in the recorded repr.
    return {k: float(v.double().sum()) for k, v in state.items()}


def _loss_files(tmp: Path) -> None:
    """A fixed learned loss (seeded LearnedLoss weights) and an evolved loss file."""
    from npbml.evomal import EvolvedLoss
    from npbml.losses import LearnedLoss

    torch.manual_seed(5)
    torch.save(LearnedLoss().state_dict(), tmp / "learned.pt")
    EvolvedLoss("mul(-1, mul(y, log(f)))").save(tmp / "evolved.json")


def fit_outputs(tmp: Path, name: str) -> dict[str, Any]:
    """Final metrics, metrics.jsonl (no wall-clock fields) and last.pt weights of one fit run."""
    from npbml.fit import fit

    loss = dict(FIT_LOSSES[name])
    if "checkpoint" in loss:
        loss["checkpoint"] = loss["checkpoint"].format(tmp=tmp)
        _loss_files(tmp)
    threads = torch.get_num_threads()
    try:
        out = tmp / f"fit_{name}"
        final = fit(fit_config(blobs_npz(tmp / "blobs.npz"), loss), out)
    finally:
        torch.set_num_threads(threads)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    last = torch.load(out / "last.pt", weights_only=True)
    return {
        "final": final,
        "metrics": _strip([json.loads(s) for s in lines]),
        "params": _param_sums(last["model"]),
    }


def train_outputs(tmp: Path) -> dict[str, Any]:
    """metrics.jsonl (no timing fields) and final parameters of a tiny MAML run."""
    sys.path.insert(0, str(HERE))
    from tiny_run import tiny_run

    from npbml.config import config_from_dict
    from npbml.train import read_metrics, train

    cfg = config_from_dict(
        tiny_run(
            {
                "meta_batch_size": 2,
                "meta_steps": 5,
                "meta_lr": 0.01,
                "val_every": 2,
                "val_tasks": 3,
                "log_every": 2,
                "checkpoint_every": 2,
                "seed": 3,
                "threads": 1,
                "lr_schedule": "cosine",
            }
        )
    )
    result = train(cfg, tmp / "train", progress=False)
    return {
        "metrics": _strip(read_metrics(tmp / "train" / "metrics.jsonl")),
        "params": _param_sums(result.learner.state_dict()),
        "best": result.best_val_accuracy,
    }


def record(tmp: Path) -> dict[str, Any]:
    return {
        "fit": {name: fit_outputs(tmp, name) for name in FIT_LOSSES},
        "train": train_outputs(tmp),
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        data = record(Path(d))
    REFERENCE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {REFERENCE}")
