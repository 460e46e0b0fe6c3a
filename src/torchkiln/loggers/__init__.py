"""Where numbers go: console, CSV/JSONL files, TensorBoard, W&B, plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchkiln.loggers.base import Logger
from torchkiln.loggers.files import CSVLogger, JSONLLogger
from torchkiln.loggers.tensorboard import TensorBoardLogger

__all__ = ["Logger", "CSVLogger", "JSONLLogger", "TensorBoardLogger", "run_loggers"]


def auto_none(value: int | str) -> int | None:
    return None if value == "auto" else int(value)


def run_loggers(run_dir: str | Path, model: Any = None, class_names: list[str] | None = None, *,
                csv: bool = True, tensorboard: bool = True, plots: bool = True, log_file: bool = True,
                summary: bool = True, histograms: int | None = None, images: int = 16,
                images_every: int | str = "auto", config: dict[str, Any] | None = None) -> list[Logger]:
    """What `kiln train` writes into a run directory, for the Python API in one call:
    `Trainer(..., run_dir=d, loggers=run_loggers(d, model))` gives metrics.csv, metrics.jsonl,
    train.log, tensorboard/, plots/ (curves, confusion matrix, per-class F1) and summary.json
    beside the checkpoints."""
    run_dir = Path(run_dir)
    loggers: list[Logger] = []
    if log_file:
        from torchkiln.loggers.summary import LogFile

        loggers.append(LogFile(run_dir))
    if csv:
        loggers += [CSVLogger(run_dir), JSONLLogger(run_dir)]
    if tensorboard:
        loggers.append(TensorBoardLogger(run_dir, model=model, histograms=histograms, images=images,
                                         images_every=auto_none(images_every), class_names=class_names,
                                         config=config or {}))
    if plots:
        from torchkiln.loggers.plots import ClassificationPlots

        loggers.append(ClassificationPlots(run_dir, class_names))
    if summary:
        from torchkiln.loggers.summary import SummaryFile

        loggers.append(SummaryFile(run_dir, curves=plots))
    return loggers
