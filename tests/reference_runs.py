"""Tiny fit and meta-training runs whose outputs were recorded from the code before the
run-directory / training-loop / updater refactor (tests/data/reference_runs.json), so the tests
can assert that the refactor changed no number.

Regenerate (only when a change of numbers is intended): ``python tests/reference_runs.py``.
"""

from __future__ import annotations

import json
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
    "adalfl_next": {"name": "adalfl", "offline_steps": 2},
    "adalfl_validation": {"name": "adalfl", "meta_batch": "validation"},
    "adalfl_same": {"name": "adalfl", "meta_batch": "same"},
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
