"""scripts/npbml_ablations.py end to end on tiny settings (--quick) on the real minimal splits:
several seeds, the nearest-prototype rows, within-alphabet test episodes, paired differences."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "npbml_ablations.py"


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("npbml_ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(ab, omniglot_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ablations")
    md = out / "results.md"
    md.write_text("# Results\n\nkeep me\n")
    argv = ["--quick", "--out", str(out), "--seeds", "0", "1", "--within-alphabet"]
    argv += ["--rows", "proto-cosine", "proto-euclidean", "init", "init/head_init=proto"]
    argv += ["--markdown", str(md)]
    assert ab.main(argv) == 0
    return {
        "out": out,
        "argv": argv,
        "md": md.read_text(),
        "res": json.loads((out / "results.json").read_text()),
    }


def test_variant_row_trains_with_its_options_and_finished_runs_are_reused(run, ab) -> None:
    import yaml

    seed0 = run["out"] / "seed0"
    snap = yaml.safe_load((seed0 / "init__head_init-proto" / "config.yaml").read_text())
    assert snap["algorithm"]["options"]["head_init"] == "proto"
    assert snap["algorithm"]["options"]["ablation"] == "init"
    plain = yaml.safe_load((run["out"] / "seed0" / "init" / "config.yaml").read_text())
    assert plain["algorithm"]["options"]["head_init"] == "row"
    # Same command again: no retraining (same recorded time), same accuracies.
    before = run["res"]["seeds"]["0"]["rows"]["init"]
    assert ab.main(run["argv"]) == 0
    again = json.loads((run["out"] / "results.json").read_text())["seeds"]["0"]["rows"]["init"]
    assert again["train_s"] == before["train_s"] and again["accuracies"] == before["accuracies"]


def test_every_row_and_seed_sees_the_same_within_alphabet_episodes(run, ab) -> None:
    res = run["res"]
    tasks = ab.QUICK["tasks"]
    ep = res["test_episodes"]
    # 5-way within-alphabet test episodes of small2's new alphabets (Tagalog has 17 >= 5).
    assert ep["within_alphabet"] and ep["alphabets"] == [
        "Japanese_(katakana)",
        "Sanskrit",
        "Tagalog",
    ]
    assert len(ep["classes"]) == tasks
    assert set(res["seeds"]) == {"0", "1"}
    for seed in res["seeds"].values():
        rows = {"proto-cosine", "proto-euclidean", "init", "init/head_init=proto"}
        assert set(seed["rows"]) == rows
        for row in seed["rows"].values():
            assert len(row["accuracies"]) == tasks == row["tasks"]
            assert row["accuracy"] == pytest.approx(np.mean(row["accuracies"]))
    # The proto rows train nothing; the NPBML row did, without a relation network (init has no
    # transductive loss term).
    s0 = res["seeds"]["0"]
    assert s0["rows"]["proto-cosine"]["train_s"] == 0 and s0["rows"]["init"]["train_s"] > 0
    assert s0["pretraining"]["relation"] is None
    assert (run["out"] / "seed0" / "backbone.pt").is_file()
    assert (run["out"] / "seed1" / "backbone.pt").is_file()


def test_paired_differences_match_a_hand_computation(run) -> None:
    res = run["res"]
    acc = {
        row: np.array([res["seeds"][s]["rows"][row]["accuracies"] for s in ("0", "1")])
        for row in ("proto-cosine", "init")
    }
    d = acc["init"] - acc["proto-cosine"]  # [seeds, episodes]
    paired = res["summary"]["paired"]["proto-cosine"]["init"]
    assert paired["mean"] == pytest.approx(d.mean())
    avg = d.mean(axis=0)
    assert paired["ci95"] == pytest.approx(1.96 * avg.std(ddof=1) / np.sqrt(avg.size))
    for s in range(2):
        per = paired["per_seed"][s]
        assert per["mean"] == pytest.approx(d[s].mean())
        assert per["ci95"] == pytest.approx(1.96 * d[s].std(ddof=1) / np.sqrt(d.shape[1]))
    assert set(res["summary"]["paired"]) == {"proto-cosine", "init"}
    pooled = res["summary"]["rows"]["init"]
    assert pooled["per_seed"] == pytest.approx(acc["init"].mean(axis=1).tolist())


def test_markdown_section_has_every_row_and_comparison(run) -> None:
    md = run["md"]
    assert md.startswith("# Results\n\nkeep me\n")
    assert "5-way 1-shot within-alphabet" in md and "Seeds 0, 1" in md
    for row in ("proto-cosine", "proto-euclidean", "init"):
        assert f"| {row} |" in md
    assert "vs proto-cosine (pp)" in md and "vs init (pp)" in md
    assert "| init - proto-cosine |" in md and "| seed 0 | seed 1 | pooled |" in md


def test_bad_flags_name_the_problem(ab) -> None:
    for rows in (["protonet"], ["full/head_init"], ["proto-cosine/head_init=proto"]):
        with pytest.raises(SystemExit):
            ab.parse_args(["--rows", *rows])
    with pytest.raises(SystemExit):
        ab.parse_args(["--seeds", "0", "--seed", "1"])
    args = ab.parse_args(["--rows", "maml", "full", "--seed", "3"])
    assert args.seeds == [3] and args.reference == []  # default references are not rows here
    args = ab.parse_args(["--pretrain-steps", "4000", "--pretrain-batch", "128"])
    assert (args.pretrain_steps, args.pretrain_batch) == (4000, 128)
    assert args.rows[:3] == ["maml", "proto-cosine", "proto-euclidean"]


def test_proto_checkpoint_works_with_npbml_eval(run, ab) -> None:
    # The proto row's checkpoint: load_learner rebuilds it from the registry ("proto"), its
    # config draws the very test episodes of the table, and `npbml eval` scores it the same.
    import subprocess
    import sys

    from npbml.evaluate import evaluate
    from npbml.train import load_learner, make_tasksets

    path = run["out"] / "seed1" / "proto-euclidean.pt"
    learner, config, _ = load_learner(path)
    assert type(learner).__name__ == "PrototypeClassifier" and learner.distance == "euclidean"
    sampler = make_tasksets(config).test
    res = evaluate(learner, sampler, ab.QUICK["tasks"], per_task=True)
    row = run["res"]["seeds"]["1"]["rows"]["proto-euclidean"]
    assert res["accuracies"] == pytest.approx(row["accuracies"])
    cmd = [sys.executable, "-m", "npbml", "eval", "--checkpoint", str(path), "--json"]
    cmd += ["--tasks", str(ab.QUICK["tasks"])]
    out = subprocess.run(cmd, cwd=SCRIPT.parents[1], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["accuracy"] == pytest.approx(row["accuracy"])


def test_maml_config_must_share_the_data_section(ab) -> None:
    ab.check_same_data(ab.parse_args([]))  # the shipped configs agree
    with pytest.raises(SystemExit, match="differ in data.name"):
        ab.check_same_data(ab.parse_args(["--maml-config", "configs/demo.yaml"]))


def test_render_rewrites_the_section_from_results_json(run, ab, tmp_path) -> None:
    md = tmp_path / "r.md"
    md.write_text("# R\n")
    argv = ["--render", "--out", str(run["out"]), "--markdown", str(md), "--command", "CMD X"]
    assert ab.main(argv) == 0
    text = md.read_text()
    assert "Command: `CMD X`" in text and "| init |" in text and "| diverged |" in text
    assert "| init - proto-cosine |" in text


def test_relation_features_is_a_row_switch_not_an_npbml_option(ab) -> None:
    row = "full/relation=features/head_init=proto"
    assert ab.base_row(row) == "full"
    assert ab.row_options(row) == ["head_init=proto"]
    assert ab.reads_features(row) and not ab.reads_features("full/head_init=proto")
    assert ab.encoder_blocks(row) == 0
    row = "full/relation=features+2/head_init=proto"
    assert ab.row_options(row) == ["head_init=proto"]
    assert ab.reads_features(row) and ab.encoder_blocks(row) == 2
    with pytest.raises(ValueError, match="relation=features\\+K"):
        ab.encoder_blocks("full/relation=features+x")
