"""Where numbers go: console, CSV/JSONL files, TensorBoard, W&B, plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchkiln.loggers.base import Logger
from torchkiln.loggers.files import CSVLogger, JSONLLogger
from torchkiln.loggers.tensorboard import TensorBoardLogger

__all__ = ["Logger", "CSVLogger", "JSONLLogger", "TensorBoardLogger", "build_loggers", "run_loggers"]


def auto_none(value: int | str) -> int | None:
    return None if value == "auto" else int(value)


def build_loggers(cfg: Any, run_dir: Path, model: Any = None, class_names: list[str] | None = None) -> list[Logger]:
    """The loggers `cfg.logging` asks for (a validated Config), writing into `run_dir`."""
    from torchkiln.config.load import to_plain

    lg, plain = cfg.logging, to_plain(cfg)
    loggers = run_loggers(run_dir, model, class_names, csv=lg.csv, tensorboard=lg.tensorboard, plots=lg.plots,
                          histograms=lg.histograms, images=lg.images, images_every=lg.images_every,
                          config=plain, log_file=False, summary=False)  # the CLI keeps its own
    if lg.wandb is not None:
        from torchkiln.loggers.wandb import WandbLogger

        w = lg.wandb
        loggers.append(WandbLogger(run_dir, project=w.project, mode=w.mode, entity=w.entity, name=w.name,
                                   tags=w.tags, config=plain, images=lg.images, class_names=class_names,
                                   images_every=auto_none(lg.images_every)))
    return loggers


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
