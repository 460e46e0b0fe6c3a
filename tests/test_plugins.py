"""Plugins by entry points: loaded at the first lookup, a broken one is one warning (an error with
KILN_STRICT_PLUGINS=1), a name registered twice is refused naming both sources; `kiln list`."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT, kiln
from torchkiln.errors import ConfigError
from torchkiln.registry import BUILTIN, PluginError, Registry

PLUGIN = '''
from torch import nn


class PlugNet(nn.Linear):
    def __init__(self, num_classes: int = 10, in_features: int = 64):
        super().__init__(in_features, num_classes)
'''


def fake_distribution(where: Path, dist: str, module: str, entries: dict[str, str], code: str = PLUGIN,
                      group: str = "torchkiln.models") -> None:
    """An installed distribution as importlib.metadata sees one: a dist-info with entry points."""
    info = where / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    (where / f"{module}.py").write_text(code)


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Two distributions: `goodplug` (PlugNet) and `badplug`, whose module raises on import."""
    fake_distribution(tmp_path, "goodplug", "goodplug_models", {"PlugNet": "goodplug_models:PlugNet"})
    fake_distribution(tmp_path, "badplug", "badplug_models", {"BadNet": "badplug_models:BadNet"},
                      code="raise RuntimeError('the plugin is broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("KILN_STRICT_PLUGINS", raising=False)
    yield tmp_path
    for name in ("goodplug_models", "badplug_models"):
        sys.modules.pop(name, None)


def test_entry_points_load_at_the_first_lookup_and_a_broken_one_is_one_warning(plugins, caplog):
    reg = Registry("model", group="torchkiln.models")
    assert "goodplug_models" not in sys.modules  # nothing is imported before a name is looked up
    with caplog.at_level(logging.WARNING, logger="torchkiln"):
        factory = reg.get("PlugNet")
    assert factory.__module__ == "goodplug_models"
    assert reg.source("PlugNet") == "plugin 'goodplug' (goodplug_models:PlugNet)"
    [warning] = [r.getMessage() for r in caplog.records if "badplug" in r.getMessage()]
    assert "plugin 'badplug'" in warning and "RuntimeError: the plugin is broken" in warning
    assert "\n" not in warning
    assert "BadNet" not in reg.names() and "PlugNet" in reg.names()
    caplog.clear()
    reg.get("PlugNet")  # loaded once: no second warning
    assert not caplog.records


def test_strict_plugins_make_a_broken_plugin_an_error(plugins, monkeypatch):
    monkeypatch.setenv("KILN_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"plugin 'badplug'.*RuntimeError: the plugin is broken"):
        Registry("model", group="torchkiln.models").get("PlugNet")


def test_a_name_registered_twice_is_refused_naming_both_sources(plugins, monkeypatch, caplog):
    from torchkiln.models.small import SmallCNN

    reg = Registry("model", group="torchkiln.models")
    reg.register(SmallCNN, name="PlugNet")  # a built-in already holds the plugin's name
    assert reg.source("PlugNet") == BUILTIN
    with caplog.at_level(logging.WARNING, logger="torchkiln"):
        assert reg.get("PlugNet") is SmallCNN
    [warning] = [r.getMessage() for r in caplog.records if "goodplug" in r.getMessage()]
    assert "registered twice: by built-in and by plugin 'goodplug' (goodplug_models:PlugNet)" in warning

    with pytest.raises(ConfigError, match="model 'PlugNet' is registered twice: by built-in and by goodplug_models;"):
        reg.register(sys.modules["goodplug_models"].PlugNet)  # in code, too
    reg.register(SmallCNN, name="PlugNet")  # the same object again (a module imported twice) is no clash
    shutil.rmtree(plugins / "badplug-0.1.dist-info")
    monkeypatch.setenv("KILN_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="plugin 'goodplug'.*registered twice: by built-in and by plugin 'goodplug'"):
        fresh = Registry("model", group="torchkiln.models")
        fresh.register(SmallCNN, name="PlugNet")
        fresh.get("PlugNet")


def test_a_plugin_taking_a_torch_name_is_refused(plugins, caplog):
    fake_distribution(plugins / "more", "lossplug", "lossplug_mod", {"MSELoss": "lossplug_mod:PlugNet"},
                      group="torchkiln.losses")
    sys.path.insert(0, str(plugins / "more"))
    try:
        reg = Registry("loss", group="torchkiln.losses", fallbacks=["torch.nn"],
                       predicate=lambda o: isinstance(o, type) and o.__name__.endswith("Loss"))
        with caplog.at_level(logging.WARNING, logger="torchkiln"):
            assert reg.get("MSELoss").__module__.startswith("torch")
        assert any("registered twice: by torch and by plugin 'lossplug'" in r.getMessage() for r in caplog.records)
    finally:
        sys.path.remove(str(plugins / "more"))
        sys.modules.pop("lossplug_mod", None)


def test_kiln_list_shows_sources_and_signatures_and_filters(plugins):
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{plugins}", "OMP_NUM_THREADS": "1"}
    out = kiln("list", "models", "--filter", "net", env=env, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("models (")
    plug = next(line for line in lines if line.split()[0] == "PlugNet")
    assert "plugin 'goodplug'" in plug and "(num_classes: int = 10, in_features: int = 64)" in plug
    assert any(line.split()[:2] == ["timm:resnet18", "timm"] for line in lines)
    assert any(line.split()[:2] == ["torchvision:resnet18", "torchvision"] for line in lines)
    assert all("net" in line.split()[0].lower() for line in lines[1:])
    [warning] = [line for line in out.stderr.splitlines() if "badplug" in line]  # one line, the rest work


def test_kiln_list_with_strict_plugins_is_one_line_and_exit_2(plugins, cli, monkeypatch):
    # in this process: `kiln list models` over a models registry that has not loaded its plugins yet
    # (this process's own has loaded them already), as a fresh `kiln` would see it
    from torchkiln.registry import KINDS

    monkeypatch.setitem(KINDS, "models", Registry("model", group="torchkiln.models"))
    monkeypatch.setenv("KILN_STRICT_PLUGINS", "1")
    code, out, err = cli("list", "models", "--filter", "plug")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("error: plugin 'badplug'") and "RuntimeError: the plugin is broken" in err


def test_kiln_list_losses_and_unknown_kinds(cli):
    code, out, _ = cli("list", "loss", "--filter", "focal")
    assert code == 0
    [row] = out.splitlines()[1:]
    assert row.split()[:2] == ["FocalLoss", "built-in"] and "gamma" in row
    code, out, _ = cli("list", "optimizers", "--filter", "adamw")
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [["AdamW", "torch"]]
    code, _, err = cli("list", "modles")
    assert code == 2 and "did you mean 'models'?" in err
