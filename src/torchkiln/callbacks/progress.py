"""What the console shows while training (a bar per epoch) and the accelerator's numbers per epoch."""

from __future__ import annotations

from typing import Any

from torchkiln.engine.callbacks import Callback, StepInfo
from torchkiln.loggers.device import DeviceStats
from torchkiln.loggers.progress import Progress


class ProgressBar(Callback):
    """A bar per epoch on a terminal (nothing otherwise), with the loss every `every_n_steps` steps."""

    rank_zero_only = True

    def __init__(self, stream: Any = None, every_n_steps: int = 10):
        self.progress = Progress(enabled=True, stream=stream)
        self.every_n_steps = max(1, int(every_n_steps))

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.progress.epoch_start(epoch + 1, trainer.epochs, trainer.batches_in_epoch,
                                  done=trainer.loop.batch_in_epoch)

    def on_train_batch_end(self, trainer: Any, batch: int, samples: int) -> None:
        self.progress.advance(1, samples)

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        if self.progress.interactive and info.step % self.every_n_steps == 0:
            self.progress.show({"loss": float(info.loss)})

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, float]) -> None:
        self.progress.clear()

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        self.progress.close()


class DeviceStatsMonitor(Callback):
    """Peak memory (and GPU utilization with nvidia-ml-py) per epoch on CUDA; nothing elsewhere."""

    def __init__(self, every_n_steps: int = 10):
        self.every_n_steps = max(1, int(every_n_steps))
        self.stats: DeviceStats | None = None

    def on_fit_start(self, trainer: Any) -> None:
        self.stats = DeviceStats(trainer.device)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.stats.epoch_start()

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        if info.step % self.every_n_steps == 0:
            self.stats.sample()

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, float]) -> None:
        record.update(self.stats.epoch_end())
