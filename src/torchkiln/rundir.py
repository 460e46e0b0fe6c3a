"""A run directory's names and lookups: where a run lives, what its files are called, which
checkpoint to resume from. Every module that reads or writes a run's files takes the names here.

```
<output_dir>/<name>/<timestamp>/
  config.yaml  train.log  metrics.csv  metrics.jsonl  summary.json  normalization.json
  skipped_files.txt  <split>_metrics.json  <split>_report.txt
  checkpoints/ last.ckpt best.ckpt epoch-001.ckpt step-000450.ckpt ...
  tensorboard/  plots/  export/
```
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Protocol

from torchkiln.errors import CheckpointError, ConfigError

log = logging.getLogger("torchkiln")

CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoints
LAST = "last.ckpt"
BEST = "best.ckpt"
NUMBERED = re.compile(r"(epoch|step)-\d+\.ckpt$")  # epoch-NNN.ckpt, step-NNNNNN.ckpt: kept by keep_last
CONFIG = "config.yaml"  # the resolved config: all that is needed to rerun
TRAIN_LOG = "train.log"
METRICS_CSV = "metrics.csv"  # one row per epoch
METRICS_JSONL = "metrics.jsonl"  # epoch rows and per-step rows
SUMMARY = "summary.json"
NORMALIZATION = "normalization.json"  # data.normalize's statistics
SKIPPED = "skipped_files.txt"  # the broken inputs `data.on_error: skip` left out
DATA_REPORT = "data_report.json"  # detection: the annotation audit's counts (data.boxes)
PLOTS = "plots"
CURVES = "curves.png"  # in plots/
TENSORBOARD = "tensorboard"
EXPORT = "export"  # `kiln export`'s default output folder
PREDICTIONS = "predictions/predictions.csv"  # `kiln predict`'s default output file
FOLDS = "folds.json"  # `kiln train --folds`: the summary beside the folds' runs
MEMORY_SNAPSHOT = "memory_snapshot.pickle"  # `kiln train --memory-snapshot N` (CUDA)


class Named(Protocol):
    """What the lookups need of a config: where its runs go and their name."""

    output_dir: str
    name: str


def split_metrics(split: str) -> str:
    """`kiln test`'s metrics file for a split."""
    return f"{split}_metrics.json"


def split_report(split: str) -> str:
    """`kiln test`'s per-class tables for a split."""
    return f"{split}_report.txt"


def runs_root(cfg: Named) -> Path:
    """The folder holding every run of a config's name."""
    return Path(cfg.output_dir) / cfg.name


def plan_run_dir(cfg: Named) -> Path:
    """A new run directory's path (`output_dir/name/timestamp`), not yet made."""
    root = runs_root(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, i = root / stamp, 1
    while run_dir.exists():
        run_dir, i = root / f"{stamp}-{i}", i + 1
    return run_dir


def new_run_dir(cfg: Named) -> Path:
    run_dir = plan_run_dir(cfg)
    run_dir.mkdir(parents=True)
    return run_dir


def checkpoint_path(run_dir: Path, which: str) -> Path:
    """`best` or `last` of a run directory; anything else is a checkpoint path as given."""
    if which in ("best", "last"):
        return Path(run_dir) / CHECKPOINTS / (BEST if which == "best" else LAST)
    return Path(which)


def resume_file(resume: str | Path) -> Path:
    """What `Trainer.fit(resume=...)` loads: a run directory means its last.ckpt, as on the command line."""
    path = Path(resume)
    return path / CHECKPOINTS / LAST if path.is_dir() and (path / CHECKPOINTS / LAST).is_file() else path


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to."""
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent


def find_checkpoint(target: str, cfg: Named | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from, loaded (safely) and checked, or None for `auto` without runs.

    `auto`: the newest valid checkpoint of the newest run of this config's name; a damaged newest
    checkpoint is skipped with a warning. RUN_DIR: its newest valid checkpoint. CKPT: that file.
    """
    if target == "auto":
        if cfg is None:
            raise ConfigError("--resume auto needs a config to know the run name")
        root = runs_root(cfg)
        runs = sorted((p for p in root.glob("*") if _candidates(p / CHECKPOINTS)), key=_run_order)
        if not runs:
            return None
        return _newest_valid(runs[-1] / CHECKPOINTS)
    path = Path(target)
    if path.is_dir():
        ckpt_dir = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
        if not _candidates(ckpt_dir):
            raise CheckpointError(f"{path}: no checkpoint found in {ckpt_dir}")
        return _newest_valid(ckpt_dir)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    return path, load_resumable(path)


def load_resumable(path: Path) -> dict[str, Any]:
    """A training checkpoint's content, loaded safely; plain weights are refused (nothing to resume)."""
    from torchkiln.engine.checkpoint import FORMAT, load_checkpoint

    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a torchkiln training checkpoint (plain weights hold no optimizer or loop"
            " state to resume; train from them with a new run instead)"
        )
    return state


def _newest_valid(ckpt_dir: Path) -> tuple[Path, dict[str, Any]]:
    skipped = []
    for ckpt in _candidates(ckpt_dir):
        try:
            state = load_resumable(ckpt)
        except CheckpointError as exc:
            log.warning("skipping unusable checkpoint: %s", exc)
            skipped.append(ckpt.name)
            continue
        if skipped:
            log.warning("falling back to %s (newer but unusable: %s)", ckpt, ", ".join(skipped))
        return ckpt, state
    raise CheckpointError(f"{ckpt_dir}: no usable checkpoint ({', '.join(skipped)} all damaged);"
                          " resume from another run directory or start without --resume")


def _run_order(run: Path) -> tuple[str, int]:
    """Run directories are timestamps, `-N` added on a clash: order by time, then N."""
    m = re.fullmatch(r"(\d{8}-\d{6})-(\d+)", run.name)
    return (m.group(1), int(m.group(2))) if m else (run.name, 0)


def _candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints newest first: by time written; on a tie last.ckpt, then numbered, then best."""
    if not ckpt_dir.is_dir():
        return []
    rank = {LAST: 0, BEST: 2}
    files = list(ckpt_dir.glob("*.ckpt"))
    return sorted(files, key=lambda p: (-p.stat().st_mtime_ns, rank.get(p.name, 1), p.name))


def epoch_name(epoch: int) -> str:
    return f"epoch-{epoch:03d}.ckpt"


def step_name(step: int) -> str:
    return f"step-{step:06d}.ckpt"
