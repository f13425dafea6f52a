"""Config validation: unknown keys, types, ranges, overrides, round trips, shipped configs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from npbml import config as C
from npbml.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    diff_configs,
    load_config,
    parse_override,
    register_options,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# Meta-learning configs (the schema of npbml.config). evomal_*.yaml are `npbml evolve` configs
# with their own schema (npbml.evomal) and are checked by that package's tests; fit_*.yaml are
# `npbml fit` configs (npbml.fit), checked in tests/test_fit.py.
SHIPPED = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith(("evomal", "fit_")))


def test_expected_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    for name in (
        "omniglot_5w1s.yaml",
        "omniglot_20w1s.yaml",
        "omniglot_minimal.yaml",
        "miniimagenet_5w1s.yaml",
        "miniimagenet_5w5s.yaml",
        "demo.yaml",
    ):
        assert name in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # Every value the file sets is kept (nothing silently defaulted away); registered option
    # schemas may add defaults next to them.
    _assert_contains(cfg.to_dict(), yaml.safe_load(path.read_text()), path.name)
    assert config_from_dict(cfg.to_dict()) == cfg


def _assert_contains(got, want, where):
    if isinstance(want, dict):
        for k, v in want.items():
            _assert_contains(got[k], v, f"{where}:{k}")
    elif isinstance(want, float) or isinstance(got, float):
        assert got == pytest.approx(float(want)), where
    else:
        assert got == want, where


def test_literature_settings_of_shipped_configs():
    o5 = load_config(CONFIG_DIR / "omniglot_5w1s.yaml")
    assert (o5.train.meta_batch_size, o5.algorithm.inner_lr, o5.algorithm.inner_steps) == (
        32,
        0.4,
        1,
    )
    assert o5.algorithm.eval_inner_steps == 3 and o5.model.options["variant"] == "strided"
    o20 = load_config(CONFIG_DIR / "omniglot_20w1s.yaml")
    assert (o20.data.ways, o20.train.meta_batch_size, o20.algorithm.inner_lr) == (20, 16, 0.1)
    assert o20.algorithm.inner_steps == 5
    for name, shots, batch in (("miniimagenet_5w1s", 1, 4), ("miniimagenet_5w5s", 5, 2)):
        m = load_config(CONFIG_DIR / f"{name}.yaml")
        assert (m.data.shots, m.train.meta_batch_size) == (shots, batch)
        assert (m.model.options["hidden"], m.model.options["variant"]) == (32, "maxpool")
        assert (m.algorithm.inner_lr, m.algorithm.inner_steps, m.algorithm.eval_inner_steps) == (
            0.01,
            5,
            10,
        )
    for cfg in (o5, o20):
        assert cfg.train.meta_lr == 1e-3 and cfg.train.meta_steps == 60000


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg == Config()


def test_unknown_key_names_key_section_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"algorithm": {"inner_lrr": 0.1}})
    msg = str(e.value)
    assert "'inner_lrr'" in msg and "'algorithm'" in msg
    for valid in ("inner_lr", "inner_steps", "eval_inner_steps", "first_order", "options"):
        assert valid in msg


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*algorithm, data, eval"):
        config_from_dict({"trian": {}})


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"train": {"meta_steps": 1.5}}, "train.meta_steps", "must be int"),
        ({"train": {"meta_steps": "ten"}}, "train.meta_steps", "must be int"),
        ({"data": {"ways": True}}, "data.ways", "must be int"),
        ({"train": {"meta_lr": "fast"}}, "train.meta_lr", "must be float"),
        ({"algorithm": {"first_order": "yes"}}, "algorithm.first_order", "must be bool"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer", "one of 'adam', 'sgd'"),
        ({"train": {"grad_clip": "x"}}, "train.grad_clip", "float or null"),
        ({"data": {"options": [1, 2]}}, "data.options", "must be mapping"),
        ({"data": 3}, "data", "must be mapping"),
        ({"data": {"name": 5}}, "data.name", "must be str"),
    ],
)
def test_type_errors_name_key_and_expected_type(data, key, expected):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert str(e.value).startswith(key + " must be ")
    assert expected in str(e.value)


def test_numeric_coercions():
    cfg = config_from_dict({"train": {"meta_lr": "1e-3", "grad_clip": 2}, "algorithm": {}})
    # PyYAML reads 1e-3 (no dot) as a string; float fields accept it. Ints widen to float.
    assert cfg.train.meta_lr == 1e-3 and isinstance(cfg.train.grad_clip, float)
    assert yaml.safe_load("1e-3") == "1e-3"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"data": {"ways": 0}}, "data.ways must be >= 1"),
        ({"train": {"meta_lr": 0.0}}, "train.meta_lr must be > 0"),
        ({"algorithm": {"inner_lr": -1.0}}, "algorithm.inner_lr must be >= 0"),
        ({"train": {"grad_clip": 0.0}}, "train.grad_clip must be > 0"),
        ({"data": {"name": "imagenet-9000"}}, "available: "),
    ],
)
def test_range_errors(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config_from_dict(data)


def test_overrides_parse_with_yaml_and_reach_nested_options():
    assert parse_override("train.meta_lr=3e-4") == (["train", "meta_lr"], "3e-4")
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=null") == (["a", "b"], None)
    cfg = load_config(
        None,
        [
            "train.meta_steps=7",
            "train.meta_lr=3e-4",
            "algorithm.first_order=true",
            "model.options.hidden=16",
            "data.options={num_train: 20}",
            "train.grad_clip=null",
        ],
    )
    assert cfg.train.meta_steps == 7 and cfg.train.meta_lr == pytest.approx(3e-4)
    assert cfg.algorithm.first_order is True
    assert cfg.model.options == {"hidden": 16} and cfg.data.options == {"num_train": 20}
    assert cfg.train.grad_clip is None


def test_overrides_do_not_mutate_input_and_are_validated():
    raw = {"train": {"meta_steps": 5}}
    out = apply_overrides(raw, ["train.meta_steps=9"])
    assert raw == {"train": {"meta_steps": 5}} and out["train"]["meta_steps"] == 9
    with pytest.raises(ConfigError, match="unknown key 'stepz' in section 'train'"):
        load_config(None, ["train.stepz=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["train.meta_steps"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["train.meta_steps=3", "train.meta_steps.x=1"])


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(scalar)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  metabatch: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'metabatch'"):
        load_config(typo)


def test_save_and_reload_is_identity(tmp_path):
    cfg = load_config(None, ["model.options.hidden=8", "train.lr_schedule=cosine"])
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    other = load_config(None, ["train.meta_steps=3"])
    assert diff_configs(cfg, other) == [
        "model.options.hidden",
        "train.lr_schedule",
        "train.meta_steps",
    ]


def test_registered_options_schema_validates_and_fills_defaults(monkeypatch):
    @dataclass
    class ToyOptions:
        warp_layers: int = 1
        loss_terms: list[str] | None = None

    monkeypatch.setattr(C, "OPTION_SCHEMAS", dict(C.OPTION_SCHEMAS))
    register_options("algorithm", "maml", ToyOptions)
    cfg = config_from_dict({"algorithm": {"name": "maml", "options": {"loss_terms": ["s"]}}})
    assert cfg.algorithm.options == {"warp_layers": 1, "loss_terms": ["s"]}
    with pytest.raises(ConfigError, match=r"unknown key 'warp' in section 'algorithm.options"):
        config_from_dict({"algorithm": {"options": {"warp": 2}}})
    with pytest.raises(ConfigError, match=r"algorithm.options.warp_layers must be int"):
        config_from_dict({"algorithm": {"options": {"warp_layers": "two"}}})
    # Other algorithms' options stay free-form.
    cfg = config_from_dict({"algorithm": {"name": "anil", "options": {"anything": 1}}})
    assert cfg.algorithm.options == {"anything": 1}


# --- one validator for the three config kinds ---------------------------------------------------


def _evolve_from_dict(data):
    from npbml.evomal.config import EvolveConfig

    return EvolveConfig.from_dict(data)


@pytest.mark.parametrize(
    ("build", "data", "message"),
    [
        (
            config_from_dict,
            {"train": {"meta_stepz": 3}},
            "unknown key 'meta_stepz' in section 'train'; valid keys: ",
        ),
        (
            C.fit_config_from_dict,
            {"optim": {"lrr": 0.1}},
            "unknown key 'lrr' in section 'optim'; valid keys: ",
        ),
        (
            _evolve_from_dict,
            {"search": {"populaton": 3}},
            "unknown key 'populaton' in section 'search'; valid keys: ",
        ),
    ],
    ids=["experiment", "fit", "evolve"],
)
def test_one_validator_rejects_unknown_keys_in_every_config_kind(build, data, message):
    """Experiment, fit and evolve configs report an unknown key the same way, with the section's
    valid keys in sorted order (one validator, :func:`npbml.config.build_dataclass`)."""
    import dataclasses

    from npbml.config import FitConfig
    from npbml.evomal.config import EvolveConfig

    ((section, inner),) = data.items()
    schema = {config_from_dict: Config, C.fit_config_from_dict: FitConfig}.get(build, EvolveConfig)
    cls = {f.name: f.type for f in dataclasses.fields(schema)}[section]
    section_cls = getattr(schema(), section).__class__
    valid = sorted(f.name for f in dataclasses.fields(section_cls))
    with pytest.raises(ConfigError) as e:
        build(data)
    assert str(e.value) == message + ", ".join(valid)
    assert cls  # the section exists in the schema


def test_top_level_messages_list_sections_and_plain_keys():
    with pytest.raises(ConfigError, match=r"^unknown section 'lose'; valid sections: data, loss"):
        C.fit_config_from_dict({"lose": {}})
    with pytest.raises(
        ConfigError,
        match=r"^unknown config key 'sead'; valid keys: seed, threads; valid sections: data, ",
    ):
        _evolve_from_dict({"sead": 1})


def test_build_dataclass_is_public_and_checks_types():
    @dataclass
    class Toy:
        n: int = 1
        names: list[str] | None = None

    assert C.build_dataclass(Toy, {"n": 3, "names": ["a"]}, "toy") == Toy(3, ["a"])
    assert C.build_dataclass(Toy, None) == Toy()
    with pytest.raises(ConfigError, match=r"^toy.names must be list or null, got list \[5\]"):
        C.build_dataclass(Toy, {"names": [5]}, "toy")


def test_fit_schema_is_the_same_object_from_both_homes():
    import npbml.fit

    assert npbml.fit.FitConfig is C.FitConfig
    assert npbml.fit.fit_config_from_dict is C.fit_config_from_dict
    assert npbml.fit.FitTrainConfig is C.FitTrainConfig


# --- explicit registries ------------------------------------------------------------------------


def test_registries_hold_npbml_without_importing_anything_first():
    """A fresh interpreter that imports only the config module validates NPBML's options and
    builds "npbml" by name: the registries are explicit, not filled by import side effects."""
    import subprocess
    import sys

    code = (
        "from npbml.config import config_from_dict\n"
        "cfg = config_from_dict({'algorithm': {'name': 'npbml', 'options': {}}})\n"
        "assert 'backbone_checkpoint' in cfg.algorithm.options, cfg.algorithm.options\n"
        "try:\n"
        "    config_from_dict({'algorithm': {'name': 'npbml', 'options': {'warpz': 1}}})\n"
        "except ValueError as e:\n"
        "    assert \"unknown key 'warpz'\" in str(e), e\n"
        "else:\n"
        "    raise SystemExit('npbml options were not validated')\n"
        "from npbml.algorithms import ALGORITHMS\n"
        "assert 'npbml' in ALGORITHMS and 'maml' in ALGORITHMS\n"
        "import sys\n"
        "assert 'npbml.cli' not in sys.modules, 'the library imported the CLI'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
