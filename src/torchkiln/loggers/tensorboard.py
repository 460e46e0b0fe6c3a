"""TensorBoard scalars: per-step loss, LR, grad norm; per-epoch metrics; final hparams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchkiln.loggers.base import Logger


class TensorBoardLogger(Logger):
    def __init__(self, run_dir: str | Path, subdir: str = "tensorboard"):
        self.log_dir = Path(run_dir) / subdir
        self.writer = None

    def start(self, info, resume_epoch=None, resume_step=0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events logged after the checkpoint we resume from.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=resume_step + 1 if resume_epoch is not None else None)

    def _add(self, values: dict[str, float], step: int) -> None:
        """All of a step's scalars in one event (what add_scalar writes, one event per value,
        cost ~25 us each: the per-step rows were the costliest part of logging)."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.summary import scalar

        summary = Summary(value=[v for k, x in values.items() for v in scalar(k, x).value])
        self.writer._get_file_writer().add_summary(summary, step)

    def log_steps(self, rows):
        for step, vals in rows:
            self._add(vals, step)

    def log_epoch(self, epoch, step, record):
        # Against the global step, like the step scalars: purge_step on resume then drops exactly
        # the rows logged after the checkpoint, epoch rows included. `epoch` is a scalar too.
        self._add({"epoch": epoch, **record}, step)
        self.writer.flush()

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def finish(self, summary: dict[str, Any]):
        if self.writer is None:
            return
        self.writer.flush()
        self.writer.close()
        self.writer = None
