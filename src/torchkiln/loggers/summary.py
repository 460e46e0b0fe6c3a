"""The run's closing files: summary.json, plots/curves.png (from the checkpoint's history), and,
for the Python API, train.log. `kiln train` and `run_loggers` write them through this one place."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torchkiln.loggers.base import Logger
from torchkiln.rundir import CHECKPOINTS, CURVES, LAST, PLOTS, SUMMARY, TRAIN_LOG

log = logging.getLogger("torchkiln")


def train_log_handler(path: Path) -> logging.Handler:
    """The handler that writes train.log (the CLI's run and the API's LogFile alike)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    return handler


def at_least_info() -> int:
    """Let INFO records through the torchkiln logger (the Python API sets no level); returns the
    level to put back."""
    level = log.level
    if level == logging.NOTSET or level > logging.INFO:
        log.setLevel(logging.INFO)
    return level


def write_summary(run_dir: Path, summary: dict[str, Any], name: str | None = None, curves: bool = True,
                  history: list[dict[str, Any]] | None = None) -> None:
    """summary.json, and the curves of every epoch so far: `history` (the Trainer's, which a
    resumed run loaded whole), else the one in last.ckpt (a damaged one draws no curves)."""
    run_dir = Path(run_dir)
    out = {"name": name, "run_dir": str(run_dir), **summary}
    (run_dir / SUMMARY).write_text(json.dumps(out, indent=2))
    if curves and summary.get("epochs_completed"):
        from torchkiln.loggers.plots import plot_curves

        history = history if history is not None else _saved_history(run_dir / CHECKPOINTS / LAST)
        plot_curves(history, run_dir / PLOTS / CURVES, monitor=summary.get("monitor"))


def _saved_history(last: Path) -> list[dict[str, Any]]:
    from torchkiln.engine.checkpoint import load_checkpoint
    from torchkiln.errors import CheckpointError

    if not last.is_file():
        return []
    try:
        return load_checkpoint(last)["loop"]["history"]
    except CheckpointError as exc:
        log.warning("curves: not drawn (%s)", exc)
        return []


class SummaryFile(Logger):
    """Writes summary.json (and plots/curves.png) when fit ends, stopped or not."""

    def __init__(self, run_dir: str | Path, name: str | None = None, curves: bool = True):
        self.run_dir, self.name, self.curves = Path(run_dir), name, curves

    def finish(self, summary: dict[str, Any]) -> None:
        write_summary(self.run_dir, summary, self.name, self.curves)


class LogFile(Logger):
    """train.log in the run directory for the duration of fit (the CLI keeps its own, which also
    holds what was logged while the run was built)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / TRAIN_LOG
        self._handler: logging.Handler | None = None
        self._level = logging.NOTSET

    def start(self, info, resume_epoch=None, resume_step=0):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = train_log_handler(self.path)
        log.addHandler(self._handler)
        self._level = at_least_info()
        log.info("fit: %s epochs, monitor %s (%s), initial-parameter fingerprint %s", info.get("epochs"),
                 info.get("monitor"), info.get("mode"), info.get("fingerprint"))

    def finish(self, summary):
        if self._handler is not None:
            log.info("done: best %s %s at epoch %s", summary.get("monitor"), summary.get("best"),
                     summary.get("best_epoch"))
            log.removeHandler(self._handler)
            log.setLevel(self._level)
            self._handler.close()
            self._handler = None
