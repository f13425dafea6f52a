"""scripts/npbml_diagnose.py on a tiny trained NPBML run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tiny_run import tiny_run

from npbml.config import config_from_dict
from npbml.train import train

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "npbml_diagnose.py"


def _module():
    spec = importlib.util.spec_from_file_location("npbml_diagnose", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagnose_reports_shares_and_switch_offs(tmp_path, capsys):
    algo = {
        "name": "npbml",
        "inner_lr": 0.01,
        "inner_steps": 2,
        # Zero-initialised loss networks get a zero meta-gradient (every path to the output
        # passes a zero weight), so they stay constant: each learned term's gradient share is
        # exactly 0 and switching it off changes nothing.
        "options": {"loss_terms": ["ce", "support", "reg"], "loss_init_std": 0.0,
                    "use_film": False},
    }
    train_cfg = {"meta_batch_size": 1, "meta_steps": 1, "meta_lr": 1e-3, "val_every": 1,
                 "val_tasks": 2, "log_every": 1, "seed": 0, "threads": 1}
    run = tmp_path / "run"
    train(config_from_dict(tiny_run(train_cfg, **algo)), run, progress=False)
    assert _module().main([str(run), "--tasks", "3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["gradient_share"] == {"L_S": 0.0, "R": 0.0}
    assert set(report["switched_off"]) == {"-L_S", "-R", "M=CE", "warp=I"}
    for row in report["switched_off"].values():
        assert row["mean"] == 0.0 and row["accuracy"] == report["trained"]["accuracy"]
    assert report["trained"]["diverged"] == 0
    assert report["inner_clipped"] == 0.0  # norm-10 safeguard, CE gradients of a tiny model
    assert report["without_safeguard"]["mean"] == 0.0
