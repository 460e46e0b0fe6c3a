"""The loop's position and decisions, as plain data that goes into every checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

log = logging.getLogger("torchkiln")


@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken (skipped fp16 steps included)
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch
    best: float | None = None
    best_epoch: int | None = None
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every number of the history, a cost per checkpoint
        # that grows with the epochs (the rows hold floats and strings only). The rows are copied
        # in C (map), without a Python call per row.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["history"] = list(map(dict, self.history))
        return data

    def check_continuation(self, epochs: int) -> None:
        """A second fit of one Trainer continues this state: at an epoch's end only (the loader and
        the epoch's sums of a stop mid-epoch are in its checkpoint, not here)."""
        from torchkiln.errors import SettingError

        if self.batch_in_epoch > 0:
            raise SettingError("fit", f"this Trainer's last fit stopped in epoch {self.epoch + 1} (after batch"
                               f" {self.batch_in_epoch}); continue it from its checkpoint: fit(..., resume=PATH)")
        if self.epoch >= epochs:
            log.info("this Trainer has trained its %d epochs; set trainer.epochs higher to train longer", self.epoch)
        else:
            log.info("continuing this Trainer's last fit at epoch %d, step %d", self.epoch + 1, self.global_step)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class StopRequested(Exception):
    """A signal asked the run to stop; a checkpoint was written before this was raised."""

    def __init__(self, signum: int, checkpoint: str | None):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
        self.checkpoint = checkpoint
