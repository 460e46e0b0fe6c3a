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
