"""The run directory: config snapshot and resumable check, metrics log, atomic last/best."""

from __future__ import annotations

import json
import os

import pytest
import torch

import npbml.checkpoint as ckpt_mod
from npbml.checkpoint import CheckpointError
from npbml.config import ConfigError
from npbml.run_dir import RunDir, diff_mappings


def test_diff_mappings_names_nested_keys_and_ignores_list_vs_tuple():
    a = {"train": {"lr": 0.1, "steps": 5}, "data": {"splits": ["a", "b"]}}
    b = {"train": {"lr": 0.2, "steps": 5, "new": 1}, "data": {"splits": ("a", "b")}}
    assert diff_mappings(a, b) == ["train.lr", "train.new"]
    assert diff_mappings(a, a) == []


def test_snapshot_round_trips_in_yaml_and_json(tmp_path):
    cfg = {"train": {"lr": 0.1, "hidden": [4, 4]}, "name": "x"}
    for name in ("config.yaml", "config.json"):
        run = RunDir(tmp_path / name.split(".")[1], config_name=name)
        assert run.saved_config() is None
        run.save_config(cfg)
        assert run.saved_config() == cfg
    # The YAML snapshot keeps the config's key order (as Config.save did).
    text = (tmp_path / "yaml/config.yaml").read_text()
    assert text.index("train") < text.index("name")


def test_changed_config_is_refused_with_the_keys_and_values(tmp_path):
    run = RunDir(tmp_path)
    saved = {"train": {"lr": 0.1, "threads": 1, "steps": 10}}
    run.check_resumable(saved, saved)  # unchanged: fine
    changed = {"train": {"lr": 0.2, "threads": 4, "steps": 10}}
    with pytest.raises(ConfigError, match=r"different config \(changed: train.lr\)") as err:
        run.check_resumable(saved, changed, ignore={"train.threads"})
    assert "0.1 -> 0.2" in str(err.value) and "--no-resume" in str(err.value)
    # Harmless keys are ignored; a tolerate hook accepts what remains.
    run.check_resumable(
        saved, {"train": {"lr": 0.1, "threads": 8, "steps": 10}}, ignore={"train.threads"}
    )
    longer = {"train": {"lr": 0.1, "threads": 1, "steps": 20}}
    run.check_resumable(saved, longer, tolerate=lambda keys: keys == ["train.steps"])
    with pytest.raises(ConfigError, match="train.steps"):
        run.check_resumable(saved, longer, tolerate=lambda keys: False)


def test_metrics_append_and_truncate_to_the_resume_step(tmp_path):
    run = RunDir(tmp_path)
    run.start_fresh()
    for step in (1, 2, 2, 3, 4):
        run.append_metrics({"step": step, "loss": 1.0 / step})
    run.truncate_metrics(2)
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 2]
    run.append_metrics({"step": 3, "loss": 0.5})
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 2, 3]
    # A line cut by a kill mid-write ends the readable log.
    with run.metrics_path.open("a") as f:
        f.write('{"step": 4, "lo')
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 2, 3]
    run.truncate_metrics(3)
    assert json.loads(run.metrics_path.read_text().splitlines()[-1]) == {"step": 3, "loss": 0.5}


def test_start_fresh_forgets_an_earlier_run(tmp_path):
    run = RunDir(tmp_path)
    run.save_last({"step": 3})
    run.save_best({"step": 2})
    run.append_metrics({"step": 3})
    run.start_fresh()
    assert not run.has_last() and not run.best_path.exists()
    assert run.read_metrics() == []


def test_last_and_best_are_written_atomically(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.save_last({"step": 1, "w": torch.ones(2)})
    run.save_best({"step": 1})

    def boom(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(ckpt_mod.os, "replace", boom)
    for save in (run.save_last, run.save_best):
        with pytest.raises(OSError, match="simulated"):
            save({"step": 2, "w": torch.zeros(2)})
    monkeypatch.undo()
    assert run.load_last()["step"] == 1 and torch.equal(run.load_last()["w"], torch.ones(2))
    assert run.load_best()["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]  # no temp files left


def test_json_checkpoints_and_their_errors(tmp_path):
    run = RunDir(tmp_path, last_name="checkpoint.json", best_name="best.json")
    with pytest.raises(CheckpointError, match="not found"):
        run.load_last()
    run.save_last({"generation": 3, "population": [[1, 2]]})
    run.save_best({"fitness": 0.25})
    assert run.load_last() == {"generation": 3, "population": [[1, 2]]}
    assert run.best_path.read_text().endswith("}\n")  # the best is indented for reading
    run.last_path.write_text('{"generation": ')
    with pytest.raises(CheckpointError, match="not valid JSON.*--no-resume"):
        run.load_last()


def test_a_non_writer_reads_but_never_writes(tmp_path):
    RunDir(tmp_path).append_metrics({"step": 1})
    reader = RunDir(tmp_path, writer=False)
    reader.start_fresh()
    reader.append_metrics({"step": 2})
    reader.save_last({"step": 2})
    reader.save_config({"a": 1})
    reader.write_text("x.json", "{}")
    reader.truncate_metrics(0)
    assert reader.read_metrics() == [{"step": 1}]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_check_resumable_without_a_run_directory_names_where():
    from npbml.run_dir import check_resumable

    saved = {"seed": 0, "threads": 1, "search": {"generations": 3, "population": 8}}
    longer = {"seed": 0, "threads": 4, "search": {"generations": 9, "population": 8}}
    free = {"threads", "search.generations"}
    check_resumable(saved, longer, where="the checkpoint", ignore=free)
    other = {**longer, "search": {"generations": 9, "population": 16}}
    with pytest.raises(ConfigError, match=r"^the checkpoint holds .*search.population: 8 -> 16"):
        check_resumable(saved, other, where="the checkpoint", ignore=free)


def test_checkpoints_get_the_mode_of_the_other_run_files(tmp_path):
    old = os.umask(0o022)
    try:
        run = RunDir(tmp_path / "run", config_name="config.json")
        run.save_config({"a": 1})
        run.save_last({"step": 1})
        run.save_best({"step": 1})
        run.append_metrics({"step": 1})
        modes = {p.name: p.stat().st_mode & 0o777 for p in run.path.iterdir()}
        assert modes == dict.fromkeys(["config.json", "last.pt", "best.pt", "metrics.jsonl"], 0o644)
        os.umask(0o077)
        run.save_last({"step": 2})
        assert run.last_path.stat().st_mode & 0o777 == 0o600  # the umask is respected
    finally:
        os.umask(old)


def test_legacy_fit_records_are_read_in_the_shared_layout(tmp_path):
    from npbml.run_dir import upgrade_records

    legacy = [
        {"step": 4, "epoch": 1, "lr": 0.1, "train_loss": 0.9, "val_loss": 0.8, "val_acc": 0.5},
        {"step": 8, "epoch": 2, "lr": 0.1, "train_loss": 0.7, "val_loss": 0.85, "val_acc": 0.6},
        {"step": 8, "final": True, "test_loss": 0.9, "test_acc": 0.55, "best_test_acc": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in legacy))
    records = RunDir(tmp_path).read_metrics()
    assert [(r["step"], r["split"]) for r in records] == [
        (4, "train"),
        (4, "validation"),
        (8, "train"),
        (8, "validation"),
        (8, "test"),
    ]
    assert records[0] == {"step": 4, "split": "train", "epoch": 1, "lr": 0.1, "loss": 0.9}
    assert [r["best"] for r in records if r["split"] == "validation"] == [True, False]
    assert records[3]["accuracy"] == 0.6 and records[4]["accuracy"] == 0.55
    assert records[4]["best_accuracy"] == 0.5 and records[4]["test_acc"] == 0.55
    # Records of the shared layout and of other logs pass unchanged.
    other = [{"step": 1, "split": "train", "loss": 1.0}, {"step": 2, "generation": 0}]
    assert upgrade_records(other) == other
