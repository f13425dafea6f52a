"""Ordinary supervised training: config validation, learning, exact resume, AdaLFL, Omniglot."""

import json

import numpy as np
import pytest
import torch

from npbml.config import ConfigError
from npbml.fit import fit, fit_config_from_dict, split_arrays, split_class_dataset


@pytest.fixture
def blobs(tmp_path):
    """Three Gaussian blobs in 5-D (linearly separable), saved as an .npz."""
    g = np.random.default_rng(0)
    centres = g.normal(size=(3, 5)) * 3
    y = g.integers(0, 3, 300)
    x = centres[y] + g.normal(size=(300, 5)) * 0.5
    path = tmp_path / "blobs.npz"
    np.savez(path, x=x.astype(np.float32), y=y)
    return str(path)


def _cfg(path, **loss):
    return {
        "data": {"kind": "arrays", "path": path},
        "model": {"name": "mlp", "hidden": [16]},
        "optim": {"lr": 0.05, "schedule": "cosine"},
        "loss": loss or {"name": "ce"},
        "train": {"epochs": 3, "batch_size": 32, "progress": False, "checkpoint_every": 4},
    }


def test_config_rejects_unknown_keys_and_bad_combinations(blobs):
    with pytest.raises(ConfigError, match="unknown key 'lr_rate'"):
        fit_config_from_dict({"optim": {"lr_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"guard_bounds must be \[min_ratio, max_ratio\]"):
        fit_config_from_dict({"loss": {"name": "adalfl", "guard_bounds": [2.0, 1.0]}})
    with pytest.raises(ConfigError, match="loss.checkpoint"):
        fit_config_from_dict({"loss": {"name": "learned"}})
    with pytest.raises(ConfigError, match="data.path"):
        fit_config_from_dict({"data": {"kind": "arrays"}})
    with pytest.raises(ConfigError, match="npbml evolve"):
        fit_config_from_dict({"loss": {"name": "evolved"}})
    with pytest.raises(ConfigError, match="offline_steps >= 1"):
        fit_config_from_dict({"loss": {"name": "ml3"}})
    with pytest.raises(ConfigError, match="reset_every"):
        fit_config_from_dict({"loss": {"name": "ml3", "offline_steps": 2, "reset_every": 0}})


@pytest.mark.parametrize("loss", [{"name": "ce"}, {"name": "sparse_lsr", "smoothing": 0.1}])
def test_fit_learns_and_writes_metrics(blobs, tmp_path, loss):
    final = fit(_cfg(blobs, **loss), tmp_path / "run")
    assert final["test_acc"] > 0.9  # separable blobs; chance is 1/3
    records = [json.loads(s) for s in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    # The layout shared with npbml train: a train and a validation record per epoch, then test.
    assert [(r["split"], r.get("epoch")) for r in records] == [
        (split, e) for e in (1, 2, 3) for split in ("train", "validation")
    ] + [("test", None)]
    assert records[-1]["final"] and records[-1]["accuracy"] == final["test_acc"]
    train = [r for r in records if r["split"] == "train"]
    assert train[0]["lr"] > train[-1]["lr"]  # cosine schedule
    assert (tmp_path / "run/last.pt").exists() and (tmp_path / "run/best.pt").exists()


@pytest.mark.parametrize(
    "loss",
    [
        {"name": "ce"},
        {"name": "adalfl", "offline_steps": 2},
        {"name": "adalfl", "meta_batch": "validation"},
        {"name": "adalfl", "meta_batch": "same"},
        {"name": "ml3", "offline_steps": 3},
    ],
)
def test_killed_run_resumes_exactly(blobs, tmp_path, loss):
    cfg = _cfg(blobs, **loss)
    full = fit(cfg, tmp_path / "full")
    # Killed at step 11: the last checkpoint is step 8 (checkpoint_every=4), steps 9-11 are lost.
    assert fit(cfg, tmp_path / "killed", stop_after=11) == {"stopped_at": 11}
    resumed = fit(cfg, tmp_path / "killed")
    assert resumed == full
    a = torch.load(tmp_path / "full/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed/last.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = (tmp_path / "full/metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "killed/metrics.jsonl").read_text().splitlines()
    timing = ("time", "time_s")
    strip = [{k: v for k, v in json.loads(s).items() if k not in timing} for s in ma]
    assert strip == [{k: v for k, v in json.loads(s).items() if k not in timing} for s in mb]


def test_resume_refuses_a_different_config(blobs, tmp_path):
    cfg = _cfg(blobs)
    fit(cfg, tmp_path / "run", stop_after=4)
    cfg["optim"]["lr"] = 0.1
    with pytest.raises(ConfigError, match="different config"):
        fit(cfg, tmp_path / "run")
    assert "final" in fit(cfg, tmp_path / "run", resume=False)


def test_adalfl_fit_validation_meta_batches(blobs, tmp_path):
    cfg = _cfg(blobs, name="adalfl", meta_batch="validation", meta_lr=1e-2)
    cfg["train"]["epochs"] = 5
    final = fit(cfg, tmp_path / "run")
    assert final["test_acc"] > 0.6
    assert (tmp_path / "run/loss_net.pt").exists()
    assert len(list((tmp_path / "run/loss_snapshots").glob("step*.pt"))) == 5
    pytest.importorskip("matplotlib")
    from npbml.plots import plot_run

    png = plot_run(tmp_path / "run")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_regression_arrays(tmp_path):
    g = np.random.default_rng(1)
    x = g.normal(size=(200, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5])).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=y)
    cfg = {
        "data": {"kind": "arrays", "path": str(tmp_path / "reg.npz"), "task": "regression"},
        "model": {"name": "mlp", "hidden": [16]},
        "optim": {"lr": 0.02},
        "train": {"epochs": 10, "batch_size": 32, "progress": False},
    }
    final = fit(cfg, tmp_path / "run")
    assert final["test_loss"] < 0.5 * float(np.var(y))


def test_split_helpers():
    from tasks.dataset import TensorClassDataset

    data = torch.arange(4 * 6, dtype=torch.uint8).reshape(24, 1, 1, 1)
    ds = TensorClassDataset(data, [np.arange(6 * c, 6 * c + 6) for c in range(4)])
    d = split_class_dataset(ds, 1, 2, seed=0)
    assert len(d.train[0]) == 12 and len(d.val[0]) == 4 and len(d.test[0]) == 8
    seen = torch.cat([d.train[0], d.val[0], d.test[0]]).flatten().mul(255).round().long()
    assert sorted(seen.tolist()) == list(range(24))  # disjoint and complete
    with pytest.raises(ValueError, match="too few"):
        split_class_dataset(ds, 3, 3, seed=0)
    with pytest.raises(ValueError, match="integers"):
        split_arrays(np.zeros((4, 2)), np.zeros(4), "classification", 0.25, 0.25, 0)


def test_omniglot_minimal_splits_all_characters(omniglot_root, tmp_path):
    from npbml.fit import FitDataConfig, _omniglot

    ds = _omniglot(FitDataConfig(root=str(omniglot_root), image_size=28))
    assert ds.num_classes == 242  # 136 + 156 characters, Greek and Latin counted once
    names = [ds.class_name(c) for c in range(ds.num_classes)]
    assert len(set(names)) == 242


def test_first_classes_keeps_a_few_class_problem(omniglot_root):
    from npbml.fit import build_fit_data

    cfg = fit_config_from_dict({"data": {"root": str(omniglot_root), "first_classes": 5}})
    data = build_fit_data(cfg)
    assert data.num_outputs == 5
    assert sorted(set(data.train[1].tolist())) == list(range(5))
    assert len(data.test[0]) == 15 and len(data.val[0]) == 15 and len(data.train[0]) == 70
    full = build_fit_data(fit_config_from_dict({"data": {"root": str(omniglot_root)}}))
    # The same images as classes 0-4 of the full problem (same seed, same per-class split).
    for part in ("train", "test"):
        fx, fy = getattr(full, part)
        torch.testing.assert_close(getattr(data, part)[0], fx[fy < 5])
    with pytest.raises(ConfigError, match="hold only 242 classes"):
        build_fit_data(
            fit_config_from_dict({"data": {"root": str(omniglot_root), "first_classes": 300}})
        )


def test_first_classes_and_learned_loss_options_are_validated(blobs):
    with pytest.raises(ConfigError, match="first_classes must be >= 2"):
        fit_config_from_dict({"data": {"first_classes": 1}})
    with pytest.raises(ConfigError, match="omniglot"):
        fit_config_from_dict({"data": {"kind": "arrays", "path": blobs, "first_classes": 2}})
    with pytest.raises(ConfigError, match="inputs"):
        fit_config_from_dict({"loss": {"inputs": "logits"}})
    cfg = fit_config_from_dict({"loss": {"inputs": "log_prob", "meta_batch": "same"}})
    assert cfg.loss.inputs == "log_prob" and cfg.loss.meta_batch == "same"
    with pytest.raises(ConfigError, match="meta_batch"):
        fit_config_from_dict({"loss": {"meta_batch": "previous"}})
    with pytest.raises(ConfigError, match="ce_warm_start"):
        fit_config_from_dict({"loss": {"name": "ml3", "ce_warm_start": 10, "checkpoint": "x"}})
    with pytest.raises(ConfigError, match="ce_warm_start must be >= 0"):
        fit_config_from_dict({"loss": {"ce_warm_start": -1}})


def test_offline_pairs_same_meta_batch_and_adalfl_fit(blobs, tmp_path):
    from npbml.fit import _offline_pairs

    x, y = torch.randn(50, 2), torch.arange(50) % 5
    pairs = _offline_pairs((x, y), (x[:0], y[:0]), 8, 0, "same", torch.device("cpu"))
    for _ in range(3):
        (bx, by), (mx, my) = next(pairs)
        assert torch.equal(bx, mx) and torch.equal(by, my)
    (bx, _), (mx, _) = next(_offline_pairs((x, y), (x, y), 8, 0, "next", torch.device("cpu")))
    assert not torch.equal(bx, mx)
    cfg = _cfg(blobs, name="adalfl", meta_batch="same", offline_steps=3, meta_lr=1e-2)
    cfg["train"]["epochs"] = 5
    assert fit(cfg, tmp_path / "run")["test_acc"] > 0.6  # as the "validation" test; chance 1/3


def test_ml3_fit_with_cross_entropy_warm_start_and_log_prob_inputs(blobs, tmp_path):
    from npbml.losses import LearnedLoss

    cfg = _cfg(blobs, name="ml3", offline_steps=5, inputs="log_prob", ce_warm_start=1000)
    final = fit(cfg, tmp_path / "run")
    assert final["test_acc"] > 0.9
    # The loss network ML3 started from (init.pt) is the warm start: g(log p, 1) ~ -log p and
    # g(log p, 0) ~ 0, i.e. per-class cross-entropy.
    net = LearnedLoss(inputs="log_prob")
    net.load_state_dict(torch.load(tmp_path / "run/loss_snapshots/init.pt", weights_only=True))
    p = torch.tensor([0.05, 0.5, 0.9])
    with torch.no_grad():
        on = net.g(torch.stack((p.log(), torch.ones(3)), -1))
        off = net.g(torch.stack((p.log(), torch.zeros(3)), -1))
    torch.testing.assert_close(on, -p.log(), atol=0.15, rtol=0.05)
    assert off.abs().max() < 0.15


def test_cli_fit_subcommand(blobs, tmp_path, monkeypatch, capsys):
    import yaml

    from npbml import cli

    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", [*cli.SUBCOMMAND_MODULES, "npbml.fit"])
    cfg_path = tmp_path / "fit.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(blobs)))
    out = tmp_path / "run"
    code = cli.main(
        ["fit", "--config", str(cfg_path), "--out", str(out), "--set", "train.epochs=1"]
    )
    assert code in (0, None)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["final"]
    assert cli.main(["fit", "--config", str(cfg_path), "--out", str(out), "--set", "optim.lrr=1"])
    assert "unknown key 'lrr'" in capsys.readouterr().err


def test_ml3_fit_meta_learns_offline_then_trains_with_the_frozen_loss(blobs, tmp_path):
    cfg = _cfg(blobs, name="ml3", offline_steps=30, meta_lr=1e-2)
    cfg["train"]["epochs"] = 5
    final = fit(cfg, tmp_path / "run")
    assert final["test_acc"] > 0.9  # separable blobs; chance is 1/3
    history = json.loads((tmp_path / "run/offline_meta_loss.json").read_text())["meta_loss"]
    assert len(history) == 30
    snaps = tmp_path / "run/loss_snapshots"
    init = torch.load(snaps / "init.pt", weights_only=True)
    learned = torch.load(snaps / "step00000000.pt", weights_only=True)
    assert any(not torch.equal(init[k], learned[k]) for k in init)  # ML3 changed phi
    # ... and training left it frozen: the final loss network is the one learned offline.
    final_net = torch.load(tmp_path / "run/loss_net.pt", weights_only=True)
    in_ckpt = torch.load(tmp_path / "run/last.pt", weights_only=True)["loss_net"]
    for k in learned:
        assert torch.equal(final_net[k], learned[k]) and torch.equal(in_ckpt[k], learned[k])


def test_evolved_cross_entropy_formula_trains_like_ce(blobs, tmp_path):
    # -sum_c y_c log f_c, averaged over the batch, IS cross-entropy: an evolved loss holding that
    # formula must train the same model to the same weights as loss.name='ce'.
    from npbml.evomal import EvolvedLoss

    EvolvedLoss("mul(-1, mul(y, log(f)))").save(tmp_path / "ce.json")
    ce = fit(_cfg(blobs), tmp_path / "ce")
    ev = fit(_cfg(blobs, name="evolved", checkpoint=str(tmp_path / "ce.json")), tmp_path / "ev")
    assert ev["test_acc"] == ce["test_acc"]
    assert ev["test_loss"] == pytest.approx(ce["test_loss"], rel=1e-4)
    a = torch.load(tmp_path / "ce/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ev/last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # An `npbml evolve` output folder works as well (its best.json).
    (tmp_path / "search").mkdir()
    EvolvedLoss("mul(-1, mul(y, log(f)))").save(tmp_path / "search/best.json")
    cfg = _cfg(blobs, name="evolved", checkpoint=str(tmp_path / "search"))
    cfg["train"]["epochs"] = 1
    assert "final" in fit(cfg, tmp_path / "ev2")
    cfg["loss"]["checkpoint"] = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="npbml evolve"):
        fit(cfg, tmp_path / "ev3")


def test_shipped_fit_configs_load():
    from pathlib import Path

    from npbml.config import read_yaml

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("fit_*.yaml"))
    assert paths
    for path in paths:
        cfg = fit_config_from_dict(read_yaml(path))
        assert cfg.data.kind == "omniglot" and cfg.loss.name == "ce", path.name


@pytest.mark.parametrize("name", sorted(__import__("reference_runs").FIT_LOSSES))
def test_fit_matches_the_recorded_run_of_the_previous_code(tmp_path, name):
    # Recorded from fit() before the updater/run-directory refactor: every loss kind and update
    # rule (plain optimizer, AdaLFL with each meta batch, ML3 offline) must give the same numbers
    # (to rounding: see reference_runs.assert_matches_recording).
    from reference_runs import REFERENCE, assert_matches_recording, fit_outputs

    from npbml.run_dir import upgrade_records

    recorded = json.loads(REFERENCE.read_text())["fit"][name]
    # Recorded in the earlier fit layout: compared in the shared one (the same numbers).
    recorded["metrics"] = upgrade_records(recorded["metrics"])
    outputs = json.loads(json.dumps(fit_outputs(tmp_path, name)))
    if name.startswith("adalfl"):
        # AdaLFL's train records now report CE as ``loss`` and the learned loss's value (the
        # recorded ``loss``) as ``learned_loss``, beside new diagnostics the recording lacks.
        for new, old in zip(outputs["metrics"], recorded["metrics"]):
            if "learned_loss" in new:
                new["loss"] = new.pop("learned_loss")
            for key in set(new) - set(old):
                del new[key]
    assert_matches_recording(outputs, recorded)


def test_the_recording_comparison_fails_on_a_change_of_the_math():
    """The tolerance lets rounding through (1e-7 relative) but not a real change (1e-3), nor a
    changed integer, a missing key or a NaN; a conv bias before BN is skipped as noise."""
    from reference_runs import assert_matches_recording

    recorded = {"step": 8, "loss": 2.1821355, "params": {"a.weight": 0.75, "b.conv.bias": 0.02}}
    close = {
        "step": 8,
        "loss": 2.1821355 * (1 + 1e-7),
        "params": {"a.weight": 0.75, "b.conv.bias": -0.01},
    }
    assert_matches_recording(close, recorded)
    for wrong in (
        {**close, "loss": 2.1821355 * (1 + 1e-3)},
        {**close, "loss": float("nan")},
        {**close, "step": 9},
        {**close, "params": {"a.weight": 0.7501, "b.conv.bias": 0.02}},
        {"step": 8, "loss": 2.1821355},
    ):
        with pytest.raises(AssertionError):
            assert_matches_recording(wrong, recorded)


def test_build_loss_builds_every_fit_loss_for_its_task(tmp_path):
    from npbml.evomal import EvolvedLoss
    from npbml.losses import LearnedLoss, MeanSquaredError, build_loss

    p, y = torch.randn(4, 1), torch.randn(4)
    assert torch.equal(
        build_loss("mean_squared_error", task="regression")(p, y), (p - y[:, None]).pow(2).mean()
    )
    with pytest.raises(ValueError, match="classification loss, not for task 'regression'"):
        build_loss("ce", task="regression")
    with pytest.raises(ValueError, match="is not read from a file"):
        build_loss("ce", checkpoint="x.pt")
    torch.manual_seed(3)
    net = LearnedLoss(task="regression")
    torch.save(net.state_dict(), tmp_path / "net.pt")
    loaded = build_loss("learned", task="regression", checkpoint=tmp_path / "net.pt")
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values())
    )
    EvolvedLoss("mul(-1, mul(y, log(f)))").save(tmp_path / "ev.json")
    z, t = torch.randn(5, 3), torch.randint(0, 3, (5,))
    ev = build_loss("evolved", checkpoint=tmp_path / "ev.json")
    torch.testing.assert_close(ev(z, t), torch.nn.functional.cross_entropy(z, t))
    with pytest.raises(ValueError, match="loaded from a file"):
        build_loss("evolved")
    assert isinstance(build_loss("mean_squared_error", task="regression"), MeanSquaredError)


def test_fit_loss_config_maps_to_one_builder():
    from npbml.fit import FitLossConfig, build_fit_loss
    from npbml.losses import CrossEntropy, LearnedLoss, MeanSquaredError, SparseLSR

    cpu = torch.device("cpu")
    assert isinstance(
        build_fit_loss(FitLossConfig(name="ce"), "classification", 0, cpu), CrossEntropy
    )
    assert isinstance(
        build_fit_loss(FitLossConfig(name="ce"), "regression", 0, cpu), MeanSquaredError
    )
    sparse = build_fit_loss(
        FitLossConfig(name="sparse_lsr", smoothing=0.3), "classification", 0, cpu
    )
    assert isinstance(sparse, SparseLSR) and sparse.smoothing == 0.3
    for name in ("ml3", "adalfl"):
        net = build_fit_loss(FitLossConfig(name=name, hidden=[7]), "regression", 0, cpu)
        assert isinstance(net, LearnedLoss) and net.task == "regression"
    with pytest.raises(ConfigError, match="loss.name='evolved'.*regression"):
        build_fit_loss(FitLossConfig(name="evolved", checkpoint="x.json"), "regression", 0, cpu)


def _updater_setup(blobs, **loss):
    from npbml.fit import (
        _TrainBatches,
        build_fit_data,
        build_fit_loss,
        build_fit_model,
        build_updater,
    )

    cfg = fit_config_from_dict(_cfg(blobs, **loss))
    torch.manual_seed(0)
    data = build_fit_data(cfg)
    model = build_fit_model(cfg.model, data)
    loss_fn = build_fit_loss(cfg.loss, data.task, 0, torch.device("cpu"))
    batches = _TrainBatches(data.train, cfg.train.batch_size, 0, torch.device("cpu"))
    return model, build_updater(cfg, model, loss_fn, data, batches), batches


def test_optimizer_updater_is_one_sgd_step_on_the_loss(blobs):
    import copy

    model, updater, batches = _updater_setup(blobs)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = batches(0)
    loss, extra = updater.step(model, (x, y), 0)
    ref_loss = torch.nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    opt.step()
    assert loss == ref_loss.item() and extra == {}
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert set(updater.state_dict()) == {"optimizer"}


@pytest.mark.parametrize("meta_batch", ["next", "same", "validation"])
def test_adalfl_updater_state_round_trip_continues_identically(blobs, meta_batch):
    import copy

    model, updater, batches = _updater_setup(blobs, name="adalfl", meta_batch=meta_batch)
    for k in range(3):
        updater.step(model, batches(k), k)
    saved = copy.deepcopy({"model": model.state_dict(), **updater.state_dict()})
    assert set(saved) == {"model", "adalfl", "adalfl_epoch"}  # + the epoch's diagnostic sums
    a = [updater.step(model, batches(k), k) for k in (3, 4)]
    model2, updater2, _ = _updater_setup(blobs, name="adalfl", meta_batch=meta_batch)
    model2.load_state_dict(saved["model"])
    updater2.load_state_dict(saved)
    b = [updater2.step(model2, batches(k), k) for k in (3, 4)]
    assert a == b and set(a[0][1]) == {"learned_loss", "meta_loss", "skipped"}
    with pytest.raises(ValueError, match="not the model AdaLFL was built with"):
        updater.step(model2, batches(0), 0)


def test_train_batches_next_is_the_following_steps_batch(blobs):
    from npbml.fit import _epoch_order

    _, _, batches = _updater_setup(blobs)
    spe = batches.steps_per_epoch
    x, _ = batches(spe)  # first batch of epoch 1
    order = _epoch_order(0, 1, len(batches.x))[: batches.batch_size]
    assert torch.equal(x, batches.x[order])
    assert torch.equal(
        batches(spe - 1)[0], batches.x[_epoch_order(0, 0, len(batches.x))[(spe - 1) * 32 :]]
    )


@pytest.mark.parametrize("loss", [{"name": "ce"}, {"name": "adalfl", "meta_batch": "same"}])
def test_resume_within_an_epoch_logs_the_same_train_loss(blobs, tmp_path, loss):
    # Killed at step 13: the last checkpoint (step 12) is in the middle of epoch 2 (steps 9-16),
    # whose logged train loss averages steps 9-12 from before the kill and 13-16 after it.
    cfg = _cfg(blobs, **loss)
    full = fit(cfg, tmp_path / "full")
    assert fit(cfg, tmp_path / "killed", stop_after=13) == {"stopped_at": 13}
    assert fit(cfg, tmp_path / "killed") == full

    def lines(run):
        text = (tmp_path / run / "metrics.jsonl").read_text()
        timing = ("time", "time_s")
        return [
            {k: v for k, v in json.loads(s).items() if k not in timing} for s in text.splitlines()
        ]

    assert lines("killed") == lines("full")


def test_resume_ignores_settings_that_do_not_change_the_result(blobs, tmp_path):
    cfg = _cfg(blobs)
    full = fit(cfg, tmp_path / "full")
    assert fit(cfg, tmp_path / "run", stop_after=5) == {"stopped_at": 5}
    cfg["train"].update(progress=True, threads=1, checkpoint_every=2, max_nonfinite_steps=9)
    assert fit(cfg, tmp_path / "run") == full
    cfg["optim"]["lr"] = 0.1  # this one changes the result: refused
    with pytest.raises(ConfigError, match="optim.lr"):
        fit(cfg, tmp_path / "run")


def test_stop_after_counts_total_steps(blobs, tmp_path):
    cfg = _cfg(blobs)
    assert fit(cfg, tmp_path / "run", stop_after=4) == {"stopped_at": 4}
    before = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert fit(cfg, tmp_path / "run", stop_after=4) == {"stopped_at": 4}  # no new step
    after = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert after["step"] == 4 and torch.equal(
        after["model"]["1.weight"], before["model"]["1.weight"]
    )


@pytest.mark.parametrize("optim", ["adam", "adamw", "sgd"])
def test_adalfl_runs_on_the_configured_optimizer_and_logs_ce_beside_the_learned_loss(
    blobs, tmp_path, optim
):
    """AdaLFL takes whichever optimizer the config names (issue 28: Adam was refused); the
    epoch's train record reports cross-entropy as ``loss``, the learned loss's own value as
    ``learned_loss`` and its logit gradient against CE's."""
    cfg = _cfg(blobs, name="adalfl", offline_steps=2)
    cfg["optim"] = {"name": optim, "lr": 0.01 if optim != "sgd" else 0.05}
    final = fit(cfg, tmp_path / "run")
    assert final["test_acc"] > 0.6  # chance is 1/3 (how well AdaLFL trains: tests/test_adalfl*)
    records = [json.loads(s) for s in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train" and "epoch" in r]
    assert len(train) == 3
    for r in train:
        assert {"learned_loss", "meta_loss", "grad_ratio", "grad_cosine"} <= set(r)
        assert r["grad_ratio"] > 0 and -1 <= r["grad_cosine"] <= 1
    # Cross-entropy of a 3-class model: starts below log(3) + a margin, and falls.
    assert 0 < train[-1]["loss"] < train[0]["loss"] < np.log(3) + 0.5


def test_adalfl_optimizer_state_is_the_configured_optimizers(blobs):
    model, updater, batches = _updater_setup(blobs, name="adalfl")
    assert type(updater.adalfl.optimizer) is torch.optim.SGD
    cfg = fit_config_from_dict({**_cfg(blobs, name="adalfl"), "optim": {"name": "adamw"}})
    from npbml.fit import _make_optimizer

    assert type(_make_optimizer(cfg.optim, model)) is torch.optim.AdamW
    updater.step(model, batches(0), 0)
    buffers = [updater.adalfl.optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.isfinite(b).all() for b in buffers)


def test_the_papers_models_are_fit_models(blobs, tmp_path):
    """``model.name: lenet5`` and ``logistic`` (issue 28): the loss-learning papers' models."""
    g = np.random.default_rng(1)
    y = np.arange(60) % 3
    x = g.normal(size=(60, 1, 28, 28)).astype(np.float32) + y[:, None, None, None]
    path = tmp_path / "images.npz"
    np.savez(path, x=x, y=y)
    for name, params in (("lenet5", 44426 - 850 + 84 * 3 + 3), ("logistic", 784 * 3 + 3)):
        cfg = {
            "data": {"kind": "arrays", "path": str(path)},
            "model": {"name": name},
            "train": {"epochs": 1, "batch_size": 20, "progress": False},
        }
        final = fit(cfg, tmp_path / name)
        model = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
        assert sum(v.numel() for v in model.values()) == params and 0 <= final["test_acc"] <= 1
    with pytest.raises(ConfigError, match="needs images"):
        fit({**_cfg(blobs), "model": {"name": "lenet5"}}, tmp_path / "x")  # flat features
