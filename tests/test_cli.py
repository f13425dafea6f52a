"""The ``npbml`` command line: train -> eval round trip, demo, bad input gives exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from tiny_run import tiny_run

from npbml import cli
from npbml.checkpoint import load_checkpoint

TINY = {
    **tiny_run({}, eval_inner_steps=2),
    "train": {
        "meta_batch_size": 2,
        "meta_steps": 4,
        "val_every": 2,
        "val_tasks": 3,
        "log_every": 2,
        "checkpoint_every": 2,
        "threads": 1,
    },
    "eval": {"tasks": 5},
}

# The demo with a glyph family small enough for a test (28x28 images: NPBML's relation network
# pools four times).
DEMO_SMALL = [
    "--set",
    "data.options={num_train: 12, num_validation: 6, num_test: 6, images_per_class: 4, "
    "image_size: 28}",
    "--set",
    "data.queries=2",
    "--set",
    "data.test_queries=2",
    "--set",
    "model.options={hidden: 4, variant: strided}",
    "--set",
    "train.val_every=2",
    "--set",
    "train.val_tasks=2",
    "--set",
    "train.threads=1",
]


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = d / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = d / "run"
    assert cli.main(["train", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("npbml: error: ")
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_train_then_eval_json(trained_run, capsys):
    assert load_checkpoint(trained_run / "last.pt")["step"] == 4
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(trained_run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tasks"] == 5 and res["split"] == "test" and res["ways"] == 3
    assert 0.0 <= res["accuracy"] <= 1.0 and res["ci95"] >= 0.0
    assert res["checkpoint"].endswith("best.pt")
    # Fixed test episodes: evaluating again gives the same numbers.
    assert cli.main(["eval", "--checkpoint", str(trained_run), "--json", "--tasks", "5"]) == 0
    assert json.loads(capsys.readouterr().out) == res


def test_eval_text_output_and_split(trained_run, capsys):
    args = ["eval", "--checkpoint", str(trained_run / "last.pt"), "--tasks", "3"]
    assert cli.main([*args, "--split", "validation"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("validation accuracy ") and "(95% CI, 3 tasks)" in out
    assert "maml on glyphs 3-way 1-shot" in out


def test_train_overrides_and_pause(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--config", str(tiny_yaml), "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--set", "train.meta_steps=3", "--max-steps", "1"]) == 0
    assert "paused at step 1/3" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["meta_steps"] == 3
    assert cli.main([*argv, "--set", "train.meta_steps=3"]) == 0
    assert "finished at step 3/3" in capsys.readouterr().out


def test_demo_runs_and_reports(tmp_path, capsys):
    """--data glyphs keeps the generated family (the default, real characters: test_demo.py)."""
    argv = ["demo", "--data", "glyphs", "--minutes", "0.02", "--out", str(tmp_path)]
    assert cli.main([*argv, "--tasks", "4", "--json", *DEMO_SMALL]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert [r["method"] for r in res] == [run.label for run in cli.demo.GLYPH_RUNS]
    for r in res:
        assert r["tasks"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and r["meta_steps"] >= 1
        assert r["config"]["data"]["name"] == "glyphs"


def test_demo_configs_validate():
    for run in cli.DEMO_RUNS:
        cfg = cli.demo_config(run)
        # the bundled Omniglot minimal zips: the demo needs no download
        assert cfg.data.name == "omniglot-minimal" and cfg.data.root is None


def test_missing_config_file(tmp_path, capsys):
    code = cli.main(["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)])
    assert code == 2
    assert "nope.yaml' not found" in _error_line(capsys)


def test_unknown_key_lists_valid_keys(tiny_yaml, tmp_path, capsys):
    argv = ["train", "--config", str(tiny_yaml), "--out", str(tmp_path / "r")]
    assert cli.main([*argv, "--set", "train.metasteps=3"]) == 2
    err = _error_line(capsys)
    assert "unknown key 'metasteps' in section 'train'" in err and "meta_steps" in err


def test_missing_dataset(tiny_yaml, tmp_path, capsys):
    argv = ["train", "--config", str(tiny_yaml), "--out", str(tmp_path / "r"), "--quiet"]
    overrides = ["--set", "data.name=omniglot", "--set", f"data.root={tmp_path / 'no-data'}"]
    overrides += ["--set", "data.options={}"]
    assert cli.main([*argv, *overrides]) == 2
    assert "no-data" in _error_line(capsys)


def test_bad_dataset_option(tiny_yaml, tmp_path, capsys):
    argv = ["train", "--config", str(tiny_yaml), "--out", str(tmp_path / "r"), "--quiet"]
    assert cli.main([*argv, "--set", "data.options.colour=red"]) == 2
    assert "colour" in _error_line(capsys)


def test_eval_without_checkpoint(tmp_path, capsys):
    assert cli.main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert "has no best.pt" in _error_line(capsys)
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "not found" in _error_line(capsys)


def test_eval_lake_needs_a_20_way_model(trained_run, tmp_path, capsys):
    argv = ["eval-lake", "--checkpoint", str(trained_run), "--runs", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "20-way" in _error_line(capsys)


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--out", "x"])  # --config missing
    assert e.value.code == 2


def test_commands_are_an_explicit_list(monkeypatch, capsys):
    """build_parser offers exactly cli.COMMANDS; adding a Command to the list adds a command."""
    names = [c.name for c in cli.COMMANDS]
    assert names == [
        "train",
        "eval",
        "eval-lake",
        "pretrain",
        "pretrain-relation",
        "demo",
        "fit",
        "evolve",
        "plot",
    ]

    def args(p):
        p.add_argument("--n", type=int, default=1)

    def hello(ns):
        print("hello" * ns.n)
        return 3

    monkeypatch.setattr(
        cli, "COMMANDS", [*cli.COMMANDS, cli.Command("hello", "say hello", args, hello)]
    )
    assert cli.main(["hello", "--n", "2"]) == 3
    assert capsys.readouterr().out == "hellohello\n"
    twice = [*cli.COMMANDS, cli.COMMANDS[0]]
    with pytest.raises(ValueError, match="two commands are named 'train'"):
        cli.build_parser(twice)


def _parser_of(name):
    """The argparse parser of one command, as build_parser makes it."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


# Commands that read a config, with the arguments each needs besides --set.
SET_COMMANDS = {
    "train": ["--config", "c.yaml"],
    "pretrain": ["--out", "o.pt"],
    "pretrain-relation": ["--out", "o.pt"],
    "demo": [],
    "fit": ["--config", "c.yaml", "--out", "o"],
    "evolve": ["--out", "o"],
}


@pytest.mark.parametrize("name", sorted(SET_COMMANDS))
def test_set_flag_is_the_same_on_every_command(name):
    """--set is one definition: same destination, metavar, repeatability and default."""
    parser = _parser_of(name)
    (action,) = [a for a in parser._actions if "--set" in a.option_strings]
    assert (action.dest, action.metavar, action.default) == ("overrides", "SECTION.KEY=VALUE", [])
    ns = parser.parse_args([*SET_COMMANDS[name], "--set", "a.b=1", "--set", "c=x y"])
    assert ns.overrides == ["a.b=1", "c=x y"]
    assert parser.parse_args(SET_COMMANDS[name]).overrides == []


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("train", ["train", "--config", "{cfg}", "--out", "{tmp}/r", "--quiet"]),
        ("pretrain", ["pretrain", "--config", "{cfg}", "--out", "{tmp}/b.pt"]),
        ("pretrain-relation", ["pretrain-relation", "--config", "{cfg}", "--out", "{tmp}/r.pt"]),
        ("demo", ["demo", "--out", "{tmp}/d", "--minutes", "1"]),
        ("fit", ["fit", "--config", "{cfg}", "--out", "{tmp}/f"]),
        ("evolve", ["evolve", "--out", "{tmp}/e"]),
    ],
)
def test_set_with_an_unknown_key_fails_the_same_on_every_command(name, argv, tmp_path, capsys):
    """An override is applied before validation on every command: a misspelt key is exit code 2
    with one line naming it and listing the section's valid keys; nothing is written."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    argv = [a.format(cfg=cfg, tmp=tmp_path) for a in argv]
    section, key, valid = (
        ("search", "populaton", "population")
        if name == "evolve"
        else (("train", "epochz", "epochs") if name == "fit" else ("train", "seedz", "seed"))
    )
    assert cli.main([*argv, "--set", f"{section}.{key}=1"]) == 2
    err = _error_line(capsys)
    assert f"unknown key '{key}' in section '{section}'; valid keys: " in err and valid in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "npbml", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    for name in ("train", "eval", "eval-lake", "demo", "pretrain", "fit", "evolve"):
        assert name in out.stdout


def _write_lake_runs(root, runs=20, ways=20, size=16):
    """A fake all_runs folder in Lake et al.'s layout; item i of a run is a copy of class i."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for r in range(1, runs + 1):
        run = root / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        lines = []
        for c in range(1, ways + 1):
            img = Image.fromarray((rng.random((size, size)) > 0.2).astype(np.uint8) * 255)
            img.save(run / "training" / f"class{c:02d}.png")
            img.save(run / "test" / f"item{c:02d}.png")
            lines.append(f"run{r:02d}/test/item{c:02d}.png run{r:02d}/training/class{c:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")


def test_eval_lake_on_a_20_way_checkpoint(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run20"
    overrides = [
        "--set",
        "data.ways=20",
        "--set",
        "train.meta_steps=1",
        "--set",
        "train.val_every=1",
    ]
    overrides += ["--set", "data.options.num_train=20", "--set", "data.options.num_validation=20"]
    overrides += ["--set", "data.options.num_test=20", "--set", "train.meta_batch_size=1"]
    argv = ["train", "--config", str(tiny_yaml), "--out", str(out), "--quiet", *overrides]
    assert cli.main(argv) == 0
    runs = tmp_path / "lake"
    _write_lake_runs(runs)
    capsys.readouterr()
    assert cli.main(["eval-lake", "--checkpoint", str(out), "--runs", str(runs), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["items"], res["runs"], len(res["per_run_errors"])) == (400, 20, 20)
    assert res["error_rate"] == pytest.approx(res["errors"] / 400)
    assert cli.main(["eval-lake", "--checkpoint", str(out), "--runs", str(tmp_path / "none")]) == 2
    assert "not found" in _error_line(capsys)


def test_train_default_out_dir(tiny_yaml, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--config", str(tiny_yaml), "--quiet", "--max-steps", "1"]) == 0
    assert (tmp_path / "runs" / "tiny" / "last.pt").is_file()


def test_nothing_in_the_library_imports_the_cli():
    """Importing every library module (all but npbml.cli.* and the ``python -m`` entry point)
    leaves npbml.cli unimported: the CLI sits on top, as docs/ARCHITECTURE.md's layers ask."""
    # Module names from the files (pkgutil.walk_packages would import npbml.cli to walk it).
    code = (
        "import importlib, sys\n"
        "from pathlib import Path\n"
        "import npbml\n"
        "root = Path(npbml.__file__).parent\n"
        "for f in sorted(root.rglob('*.py')):\n"
        "    parts = ('npbml',) + f.relative_to(root).with_suffix('').parts\n"
        "    if parts[-1] == '__init__':\n"
        "        parts = parts[:-1]\n"
        "    if parts[:2] == ('npbml', 'cli') or parts[-1] == '__main__':\n"
        "        continue\n"
        "    try:\n"
        "        importlib.import_module('.'.join(parts))\n"
        "    except ImportError as e:\n"
        "        if (e.name or '').startswith('npbml'):\n"
        "            raise\n"  # an optional third-party package may be missing; ours may not
        "assert 'npbml.cli' not in sys.modules, [k for k in sys.modules if 'npbml.cli' in k]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _fit_yaml(tmp_path, epochs: int = 2):
    from conftest import tiny_fit_config

    cfg = tiny_fit_config(tmp_path, epochs)
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_eval_of_a_fit_run_evaluates_its_test_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["fit", "--config", str(_fit_yaml(tmp_path)), "--out", str(out)]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli.main(["eval", "--checkpoint", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["split"] == "test" and res["rows"] == 6 and res["checkpoint"].endswith("best.pt")
    assert res["accuracy"] == final["best_test_acc"] and res["loss"] == final["best_test_loss"]
    assert cli.main(["eval", "--checkpoint", str(out / "last.pt"), "--split", "validation"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("validation accuracy ") and "(6 rows;" in text
    assert cli.main(["eval", "--checkpoint", str(out), "--tasks", "5"]) == 2
    assert "drop --tasks" in _error_line(capsys)


def test_max_steps_counts_total_steps(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--config", str(tiny_yaml), "--out", str(out), "--quiet", "--max-steps", "2"]
    assert cli.main(argv) == 0
    assert "paused at step 2/4" in capsys.readouterr().out
    for _ in range(2):  # rerunning with the same total takes no step
        assert cli.main(argv) == 0
        said = capsys.readouterr().out
        assert "nothing to do" in said and "paused at step 2/4" in said
        assert load_checkpoint(out / "last.pt")["step"] == 2
    assert cli.main([*argv[:-1], "3"]) == 0
    assert "paused at step 3/4" in capsys.readouterr().out
    assert cli.main([*argv[:-1], "0"]) == 2
    assert "--max-steps must be >= 1" in _error_line(capsys)


def test_train_out_that_is_a_file_is_refused(tiny_yaml, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    argv = ["train", "--config", str(tiny_yaml), "--out", str(tmp_path / "afile"), "--quiet"]
    assert cli.main(argv) == 2
    assert "not a directory" in _error_line(capsys)
