"""Every config shipped in configs/ validates (names and arguments resolve)."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchkiln.config.load import load_checked

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_validates(path):
    cfg = load_checked(path)
    assert cfg.name
