"""Rank 0's duties in a run: under DDP every process builds and trains, but only rank 0 makes the
run directory and writes the run's own files (train.log, config.yaml, summary.json, folds.json);
the other ranks are told the directory's path. Single-process runs are rank 0.

(The checkpoint policy, callbacks/checkpointing.py, keeps the engine's own rule for the checkpoints:
every rank takes part, rank 0 writes.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from torchkiln.commands.logs import file_log
from torchkiln.config.load import dump_yaml
from torchkiln.config.schema import Config
from torchkiln.rundir import CONFIG, FOLDS, NORMALIZATION, new_run_dir, run_dir_of, runs_root

log = logging.getLogger("torchkiln")


def _is_rank0() -> bool:
    from torchkiln.engine import distributed

    return distributed.is_rank0()


def run_dir(cfg: Config, resume: Path | None) -> Path:
    """The run's directory on every rank: a resumed checkpoint's; the one `kiln train --devices N`
    planned (rank 0 makes it); else a new one that rank 0 makes, its path sent to the others."""
    from torchkiln.engine import distributed

    if resume is not None:
        return run_dir_of(resume)
    planned = os.environ.get(distributed.RUN_DIR_ENV)
    if planned:
        path = Path(planned)
        if _is_rank0():
            path.mkdir(parents=True, exist_ok=True)
        return path
    return distributed.broadcast_object(new_run_dir(cfg) if _is_rank0() else None)


def run_log(path: Path, earlier: list[logging.LogRecord]) -> contextlib.AbstractContextManager[None]:
    """train.log on rank 0 (with the records held while the run was built); nothing elsewhere."""
    return file_log(path, earlier) if _is_rank0() else contextlib.nullcontext()


def run_files(cfg: Config, model: Any, data: Any, run_dir: Path) -> list[Any]:
    """The data's files of a run (skipped inputs, data.normalize's statistics) and the loggers that
    write the rest, on rank 0; nothing on the other ranks."""
    if not _is_rank0():
        return []
    from torchkiln.config.build import build_loggers
    from torchkiln.data.build import write_skipped
    from torchkiln.data.detection.report import write_data_report

    write_skipped(run_dir, data.skipped)
    write_data_report(run_dir, data)
    if data.normalization is not None:
        (run_dir / NORMALIZATION).write_text(json.dumps(data.normalization.to_dict(), indent=2))
    return build_loggers(cfg, run_dir, model, data.class_names)


def write_config(path: Path, cfg: Config) -> None:
    """config.yaml: the resolved config, all that is needed to rerun."""
    if _is_rank0():
        (path / CONFIG).write_text(dump_yaml(cfg))


def write_summary(cfg: Config, path: Path, summary: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """summary.json (and the curves of `history`, every epoch so far), for a finished or a stopped run."""
    if _is_rank0():
        from torchkiln.loggers.summary import write_summary as write

        write(path, summary, cfg.name, curves=cfg.logging.plots, history=history)


def folds_root(cfg: Config) -> Path:
    """`kiln train --folds`: the folder of the folds' runs, `<output_dir>/<name>/folds-<time>`."""
    from torchkiln.engine import distributed

    return distributed.broadcast_object(_new_folds_root(cfg) if _is_rank0() else None)


def _new_folds_root(cfg: Config) -> Path:
    base = runs_root(cfg) / f"folds-{time.strftime('%Y%m%d-%H%M%S')}"
    root, i = base, 1
    while root.exists():
        root, i = base.with_name(f"{base.name}-{i}"), i + 1
    root.mkdir(parents=True)
    return root


def write_folds(root: Path, result: dict[str, Any]) -> None:
    """folds.json: each fold's run and best value, with their mean and spread."""
    if _is_rank0():
        (root / FOLDS).write_text(json.dumps(result, indent=2))
