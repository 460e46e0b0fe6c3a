"""Config loading, overrides and validation: every bad input is one line and exit code 2."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import kiln, write_config
from torchkiln.config.load import apply_overrides, load_config
from torchkiln.errors import ConfigError


def _error(result) -> str:
    if isinstance(result, tuple):
        code, _, stderr = result
    else:
        code, stderr = result.returncode, result.stderr
    assert code == 2, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr  # one line, no traceback
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"trainer": {"epoch": 3}}, "trainer.epoch: unknown key; did you mean 'epochs'?"),
        ({"trainer": {"epochs": "ten"}}, "trainer.epochs: "),
        ({"model": {"args": {"num_classes": 10}}}, "model.type: required key is missing"),
        ({"model": {"type": "SmallCN"}}, "model.type: unknown model 'SmallCN'; did you mean 'SmallCNN'?"),
        ({"model": {"type": "nosuch_pkg.mod:Net"}}, "model.type: cannot import module 'nosuch_pkg.mod'"),
        ({"model": {"type": "torchkiln.models:Nope"}}, "model.type: module 'torchkiln.models' has no attribute 'Nope'"),
        ({"model": {"type": "SmallCNN", "args": {"num_clases": 10}}}, "model.args.num_clases: unknown argument for SmallCNN; did you mean 'num_classes'?"),
        ({"optimizer": {"type": "Adamw"}}, "optimizer.type: unknown optimizer 'Adamw'; did you mean 'AdamW'?"),
        ({"scheduler": {"type": "OneCycleLr"}}, "scheduler.type: unknown scheduler 'OneCycleLr'; did you mean 'OneCycleLR'?"),
        ({"loss": {"type": "CrossEntropy"}}, "loss.type: unknown loss 'CrossEntropy'; did you mean 'CrossEntropyLoss'?"),
        ({"metrics": ["acuracy"]}, "metrics.0: unknown metric 'acuracy'; did you mean 'accuracy'?"),
        ({"trainer": {"precision": "fp8"}}, "trainer.precision: "),
        ({"data": {"val_split": 0.6, "test_split": 0.5}}, "val_split + test_split must be below 1"),
    ],
)
def test_bad_config_is_one_line_with_path(tmp_path, cfg_factory, cli, patch, expected):
    cfg = cfg_factory()
    for key, value in patch.items():
        if isinstance(value, dict) and key in cfg and "type" not in value and key not in ("model",):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = write_config(tmp_path, cfg)
    line = _error(cli("train", "-c", str(path)))
    assert expected in line
    assert str(path) in line or "type" in expected or "args" in expected or "metrics" in expected
    assert not (tmp_path / "runs").exists()  # nothing heavy ran, nothing was created


def test_malformed_yaml_names_file_and_line(tmp_path, cli):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrainer: {epochs: 3\nseed: 1\n")
    line = _error(cli("train", "-c", str(path)))
    assert "bad.yaml" in line and "malformed YAML" in line and "line" in line


def test_python_object_tag_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(
        "name: x\nseed: !!python/object/apply:os.system ['touch " + str(marker) + "']\n"
    )
    line = _error(kiln("train", "-c", str(path), cwd=tmp_path))
    assert "refused YAML tag" in line
    assert not marker.exists()


def test_missing_file(tmp_path, cli):
    line = _error(cli("config", "show", "-c", str(tmp_path / "nope.yaml")))
    assert "config file not found" in line


def test_json_config_is_accepted(tmp_path, cfg_factory, cli):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg_factory()))
    code, out, _ = cli("config", "show", "-c", str(path))
    assert code == 0 and yaml.safe_load(out)["model"]["type"] == "MLP"


def test_overrides_parse_yaml_scalars_and_nested_paths(tmp_path, cfg_factory):
    path = write_config(tmp_path, cfg_factory())
    cfg = load_config(path, ["optimizer.args.lr=0.05", "trainer.epochs=3", "trainer.grad_clip=null",
                             "metrics.1=f1_weighted", "data.dataset.args={classes: [0, 1]}"])
    assert cfg.optimizer.args["lr"] == 0.05 and cfg.trainer.epochs == 3
    assert cfg.trainer.grad_clip is None
    assert cfg.metrics == ["accuracy", "f1_weighted"]
    assert cfg.data.dataset.args == {"classes": [0, 1]}


def test_bad_override_is_a_config_error():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["trainer.epochs"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_override_typo_is_caught_like_file_typo(tmp_path, cfg_factory, cli):
    path = write_config(tmp_path, cfg_factory())
    line = _error(cli("train", "-c", str(path), "trainer.epohcs=3"))
    assert "trainer.epohcs: unknown key; did you mean 'epochs'?" in line


def test_config_show_round_trips(tmp_path):
    first = kiln("config", "show", "optimizer.args.lr=0.02", check=True).stdout
    mine = tmp_path / "mine.yaml"
    mine.write_text(first)
    second = kiln("config", "show", "-c", str(mine), check=True).stdout
    assert first == second
    assert yaml.safe_load(first)["optimizer"]["args"]["lr"] == 0.02


def test_config_schema_is_json_schema(cli):
    code, out, _ = cli("config", "schema")
    schema = json.loads(out)
    assert schema["type"] == "object"
    assert {"data", "model", "optimizer", "trainer", "scheduler"} <= set(schema["properties"])


def test_default_config_is_valid():
    cfg = load_config()
    assert cfg.model.type == "SmallCNN" and cfg.data.dataset.type == "Digits"


def test_debug_shows_traceback(tmp_path, cfg_factory, cli):
    path = write_config(tmp_path, cfg_factory(trainer={"epoch": 1}))
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        cli("--debug", "train", "-c", str(path))


# ------------------------------------------------------------------------------------------
# YAML as configs read it: YAML 1.2 floats, no empty file, no key given twice
# ------------------------------------------------------------------------------------------
def _settings_text(tmp_path, cfg_factory) -> str:
    """The small config as YAML text, without the sections a test writes by hand."""
    cfg = cfg_factory()
    for key in ("optimizer", "scheduler", "loss"):
        cfg.pop(key, None)
    return yaml.safe_dump(cfg, sort_keys=False)


def test_exponent_floats_in_a_file_reach_free_form_args_as_floats(tmp_path, cfg_factory):
    """`1e-3` (YAML 1.1: a string) is a float, in `args` too, which no schema field converts."""
    path = tmp_path / "e.yaml"
    path.write_text(_settings_text(tmp_path, cfg_factory)
                    + "optimizer: {type: AdamW, args: {lr: 1e-3, weight_decay: 1.0e12}}\n"
                    + "scheduler: {type: OneCycleLR, args: {max_lr: 1e-2}}\n"
                    + "loss: {type: CrossEntropyLoss, args: {label_smoothing: 1e-1}}\n")
    kiln("config", "check", "-c", str(path), cwd=tmp_path, check=True)
    shown = yaml.safe_load(kiln("config", "show", "-c", str(path), cwd=tmp_path, check=True).stdout)
    assert shown["optimizer"]["args"] == {"lr": 0.001, "weight_decay": 1e12}
    assert shown["scheduler"]["args"]["max_lr"] == 0.01
    assert shown["loss"]["args"]["label_smoothing"] == 0.1
    assert not (tmp_path / "runs").exists()


def test_exponent_floats_in_overrides_are_floats(tmp_path):
    overrides = ["optimizer.args.lr=1e-3", "scheduler.args.max_lr=1e-2", "loss.args.label_smoothing=1e-1"]
    kiln("config", "check", *overrides, cwd=tmp_path, check=True)
    out = kiln("config", "show", *overrides, cwd=tmp_path, check=True).stdout
    assert "lr: 0.001" in out
    shown = yaml.safe_load(out)
    assert shown["optimizer"]["args"]["lr"] == 0.001 and shown["scheduler"]["args"]["max_lr"] == 0.01
    assert shown["loss"]["args"]["label_smoothing"] == 0.1


def test_a_quoted_exponent_stays_a_string_and_is_shown_quoted(tmp_path):
    line = _error(kiln("config", "check", "optimizer.args.lr='1e-3'", cwd=tmp_path))
    assert "optimizer.args.lr: expected a number" in line and "found '1e-3'" in line
    out = kiln("config", "show", "optimizer.args.lr='1e-3'", cwd=tmp_path, check=True).stdout
    mine = tmp_path / "mine.yaml"
    mine.write_text(out)  # shown quoted, so reading it back keeps the string
    again = kiln("config", "show", "-c", str(mine), cwd=tmp_path, check=True).stdout
    assert yaml.safe_load(again)["optimizer"]["args"]["lr"] == "1e-3"


@pytest.mark.parametrize("text, value", [
    ("1e-3", 0.001), ("1E5", 1e5), ("2e+4", 2e4), ("1.0e12", 1e12), ("-1e-3", -0.001), ("+1.5e3", 1500.0),
    (".5", 0.5), ("-.5", -0.5), ("3.", 3.0), ("12", 12), ("1e", "1e"), ("e5", "e5"), ("1.2.3", "1.2.3"),
    ("'1e-3'", "1e-3"), ('"2E5"', "2E5"), (".inf", float("inf")),
])
def test_yaml_12_float_forms(text, value):
    from torchkiln.config.yamlio import load_yaml

    loaded = load_yaml(f"x: {text}")["x"]
    assert loaded == value and type(loaded) is type(value)


@pytest.mark.parametrize("name, text, said", [
    ("empty.yaml", "", "empty.yaml: the file is empty"),
    ("comments.yaml", "# my config\n\n   # to do\n", "comments.yaml: the file holds only comments"),
    ("empty.json", "\n", "empty.json: the file is empty"),
])
def test_an_empty_config_file_is_refused_before_anything_is_made(tmp_path, name, text, said):
    (tmp_path / name).write_text(text)
    line = _error(kiln("train", "-c", name, cwd=tmp_path))
    assert said in line and "kiln config show" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no run directory, nothing else


def test_a_key_given_twice_names_file_key_path_and_line(tmp_path, cfg_factory):
    top = tmp_path / "top.yaml"
    top.write_text("name: x\nseed: 1\nname: y\n")
    line = _error(kiln("train", "-c", "top.yaml", cwd=tmp_path))
    assert "top.yaml: line 3, column 1: duplicate key 'name' (first given on line 1)" in line
    nested = tmp_path / "nested.yaml"
    nested.write_text(_settings_text(tmp_path, cfg_factory)
                      + "optimizer:\n  type: Adam\n  args:\n    lr: 0.01\n    lr: 0.02\n")
    line = _error(kiln("config", "check", "-c", "nested.yaml", cwd=tmp_path))
    lr_line = nested.read_text().splitlines().index("    lr: 0.02") + 1
    assert f"nested.yaml: line {lr_line}, column 5: duplicate key 'optimizer.args.lr'" in line
    line = _error(kiln("config", "show", "data.dataset.args={classes: [0], classes: [1]}", cwd=tmp_path))
    assert "duplicate key 'data.dataset.args.classes'" in line
    assert not (tmp_path / "runs").exists()


def test_merge_keys_still_work_and_may_be_overridden(tmp_path):
    from torchkiln.config.load import read_file

    path = tmp_path / "m.yaml"
    path.write_text("a: &base {lr: 1, wd: 2}\nb:\n  <<: *base\n  lr: 3\nc: [{x: 1}, {x: 2, y: 3}]\n")
    assert read_file(path) == {"a": {"lr": 1, "wd": 2}, "b": {"lr": 3, "wd": 2}, "c": [{"x": 1}, {"x": 2, "y": 3}]}
    path.write_text("c: [{x: 1}, {x: 2, x: 3}]\n")
    with pytest.raises(ConfigError, match=r"line 1, column 20: duplicate key 'c\.1\.x'"):
        read_file(path)


def test_a_directory_given_as_config_says_so(tmp_path):
    (tmp_path / "configs").mkdir()
    line = _error(kiln("config", "show", "-c", "configs", cwd=tmp_path))
    assert "configs: is a directory, not a config file" in line
