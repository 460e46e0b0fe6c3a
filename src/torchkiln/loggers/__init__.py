"""Where numbers go: console, CSV/JSONL files, TensorBoard, W&B, plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchkiln.loggers.base import Logger
from torchkiln.loggers.files import CSVLogger, JSONLLogger
from torchkiln.loggers.tensorboard import TensorBoardLogger

__all__ = ["Logger", "CSVLogger", "JSONLLogger", "TensorBoardLogger", "build_loggers"]


def auto_none(value: int | str) -> int | None:
    return None if value == "auto" else int(value)


def build_loggers(cfg: Any, run_dir: Path, model: Any = None, class_names: list[str] | None = None) -> list[Logger]:
    """The loggers `cfg.logging` asks for (a validated Config), writing into `run_dir`."""
    from torchkiln.config.load import to_plain

    lg, plain = cfg.logging, to_plain(cfg)
    loggers: list[Logger] = []
    if lg.csv:
        loggers += [CSVLogger(run_dir), JSONLLogger(run_dir)]
    if lg.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, model=model, histograms=lg.histograms, images=lg.images,
                                         images_every=auto_none(lg.images_every),
                                         class_names=class_names, config=plain))
    if lg.wandb is not None:
        from torchkiln.loggers.wandb import WandbLogger

        w = lg.wandb
        loggers.append(WandbLogger(run_dir, project=w.project, mode=w.mode, entity=w.entity, name=w.name,
                                   tags=w.tags, config=plain, images=lg.images, class_names=class_names,
                                   images_every=auto_none(lg.images_every)))
    if lg.plots:
        from torchkiln.loggers.plots import ClassificationPlots

        loggers.append(ClassificationPlots(run_dir, class_names))
    return loggers
