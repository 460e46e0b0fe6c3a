"""A run's own data, rebuilt from its `config.yaml` with the statistics its checkpoint carries: the
test or validation split for `kiln predict --input split:test|val`, and real inputs for the parity
checks of `kiln export`. The one place in inference/ that reads a run's config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchkiln.errors import ConfigError
from torchkiln.inference.card import NORMALIZATION_KEY
from torchkiln.rundir import CONFIG


def run_data(run_dir: Path, state: dict[str, Any] | None = None) -> Any:
    """The run's datasets per split (eval transforms on val and test), as `kiln test` builds them."""
    from torchkiln.config.build import build_data
    from torchkiln.config.load import read_file, resolve

    cfg_path = Path(run_dir) / CONFIG
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG})")
    cfg = resolve(read_file(cfg_path), str(cfg_path))
    config = (state or {}).get("config") if isinstance(state, dict) else None
    stored = config.get(NORMALIZATION_KEY) if isinstance(config, dict) else None
    return build_data(cfg, normalization=stored)


def run_split(run_dir: Path, checkpoint: Path | None, split: str) -> Any:
    from torchkiln.engine.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    dataset = getattr(run_data(run_dir, state), split)
    if dataset is None:
        raise ConfigError(f"{Path(run_dir) / CONFIG}: this run has no {split} split (data.{split}_split or"
                          f" data.{split}_dataset); use split:val or a folder / CSV of inputs")
    return dataset
