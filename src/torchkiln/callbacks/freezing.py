"""Freezing and unfreezing on a schedule (models.freeze.Freezer), as a callback."""

from __future__ import annotations

import logging
from typing import Any

from torchkiln.engine.callbacks import Callback

log = logging.getLogger("torchkiln")


class FreezeSchedule(Callback):
    """Freezes what `freezer` names until its `unfreeze_at_epoch`; after any change the distributed
    wrapper is rebuilt over the new trainable set (the ranks change at the same epoch)."""

    def __init__(self, freezer: Any):
        self.freezer = freezer

    def on_fit_start(self, trainer: Any) -> None:
        if self.freezer.set_epoch(trainer.loop.epoch):
            trainer.placement.trainable_changed()
        log.info("frozen: %s", self.freezer.describe())

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if not self.freezer.set_epoch(epoch):
            return
        trainer.placement.trainable_changed()
        trainable, frozen = self.freezer.counts()
        log.info("epoch %d: %s; %d parameters trainable, %d frozen", epoch + 1,
                 "froze" if self.freezer.frozen else "unfroze", trainable, frozen)
