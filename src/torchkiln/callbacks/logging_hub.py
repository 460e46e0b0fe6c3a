"""The loggers, driven through the callback protocol: per-step rows (their scalars leave the
device once per log interval), the epoch's line and record, validation samples, start and finish."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from torchkiln.engine.callbacks import Callback, StepInfo
from torchkiln.loggers.base import Logger
from torchkiln.loggers.progress import log_epoch_line


class LoggerHub(Callback):
    rank_zero_only = True  # rank duties: only rank 0 logs

    def __init__(self, loggers: Iterable[Logger] = (), every_n_steps: int = 10):
        self.loggers = list(loggers)
        self.every_n_steps = max(1, int(every_n_steps))
        self._rows: list[tuple[int, dict[str, Any]]] = []
        self._wanting: list[Logger] = []

    def add(self, loggers: Iterable[Logger]) -> None:
        self.loggers.extend(loggers)

    @property
    def wants_steps(self) -> bool:
        return bool(self.loggers)

    def on_fit_start(self, trainer: Any) -> None:
        resumed = trainer.resumed
        info = {"fingerprint": trainer.initial_fingerprint, "epochs": trainer.epochs, "best": trainer.loop.best,
                **trainer.monitor.describe()}
        for lg in self.loggers:
            lg.start(info, resume_epoch=trainer.loop.epoch + 1 if resumed else None,
                     resume_step=trainer.loop.global_step)

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        if not self.loggers:
            return
        row: dict[str, Any] = {"train/loss_step": info.loss.detach().float()}
        if info.grad_norm is not None:
            row["train/grad_norm"] = info.grad_norm.float()
        for i, lr in enumerate(info.lrs):
            row[f"lr/group{i}"] = lr
        self._rows.append((info.step, row))
        if info.step % self.every_n_steps == 0:
            self.flush_steps(trainer.skipped_steps)

    def flush_steps(self, skipped: int = 0) -> None:
        if not self._rows:
            return
        tensors = [v for _, row in self._rows for v in row.values() if isinstance(v, torch.Tensor)]
        values = iter(torch.stack(tensors).tolist()) if tensors else iter(())
        rows = [(s, {k: (next(values) if isinstance(v, torch.Tensor) else v) for k, v in row.items()})
                for s, row in self._rows]
        self._rows = []
        if skipped:
            rows[-1][1]["train/skipped_steps"] = float(skipped)
        for lg in self.loggers:
            lg.log_steps(rows)

    def validation_samples(self, trainer: Any, epoch: int) -> int | None:
        self._wanting = [lg for lg in self.loggers if lg.wants_validation(epoch + 1)]  # asked once an epoch
        return max(lg.max_images for lg in self._wanting) if self._wanting else None

    def on_validation_end(self, trainer: Any, epoch: int, record: dict[str, float], samples: list) -> None:
        from torchkiln.loggers.validation import BoxSample

        for lg in self._wanting:
            for sample in samples:  # one per view: the classes, or each head and the combined class
                draw = lg.log_boxes if isinstance(sample, BoxSample) else lg.log_validation  # or boxes
                draw(epoch + 1, trainer.loop.global_step, sample)

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, float]) -> None:
        self.flush_steps(trainer.skipped_steps)
        log_epoch_line(epoch + 1, trainer.epochs, record)
        for lg in self.loggers:
            lg.log_epoch(epoch + 1, trainer.loop.global_step, record)

    def on_save_checkpoint(self, trainer: Any, state: dict[str, Any]) -> None:
        """Everything logged up to a checkpoint is on disk, so a resume neither loses nor repeats
        rows (loggers drop what was logged after the checkpoint they resume from)."""
        self.flush_steps(trainer.skipped_steps)
        for lg in self.loggers:
            lg.flush()

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        self.flush_steps(trainer.skipped_steps)
        for lg in self.loggers:
            lg.finish(summary)
