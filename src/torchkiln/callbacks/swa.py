"""Stochastic weight averaging (`trainer.swa`), with torch.optim.swa_utils.

From epoch `start_epoch` (1-based) on, torch's `SWALR` sets the learning rate: it anneals from the
current LR to `lr` over `anneal_epochs` epochs (cosine) and holds it; the run's own scheduler is
overruled for those epochs. At the end of each of those epochs the weights go into an
`AveragedModel` (an equal-weight average). At the end of the run's last epoch (`trainer.epochs`),
`update_bn` recomputes the BatchNorm statistics of the average on the training batches, and that
epoch is validated on the averaged weights; its checkpoints (last.ckpt, and best.ckpt when it is
the best) hold them as `state["averaged"]` (kind "swa"), which `kiln test`, `kiln export` and
`kiln predict` use. `state["model"]` stays the training weights, so a resume continues training
and averaging exactly. A run stopped early (early stopping) before its last epoch keeps the
average in its checkpoints' callback state but never uses it (stated in the log).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from torchkiln.callbacks.ema import put_weights
from torchkiln.engine.callbacks import Callback, StepInfo
from torchkiln.engine.checkpoint import AVERAGED
from torchkiln.errors import SettingError
from torchkiln.seeding import rng_state, set_rng_state

log = logging.getLogger("torchkiln")


class SWA(Callback):
    """See the module's docstring."""

    def __init__(self, start_epoch: int, lr: float, anneal_epochs: int = 1, anneal_strategy: str = "cos"):
        if int(start_epoch) < 1:
            raise SettingError("swa.start_epoch", f"expected an epoch >= 1; found {start_epoch}")
        if not float(lr) > 0:
            raise SettingError("swa.lr", f"expected a learning rate > 0; found {lr}")
        self.start_epoch, self.lr = int(start_epoch), float(lr)
        self.anneal_epochs, self.anneal_strategy = int(anneal_epochs), anneal_strategy
        self.averaged: torch.optim.swa_utils.AveragedModel | None = None
        self.swalr: torch.optim.swa_utils.SWALR | None = None
        self.lrs: list[float] | None = None  # what SWALR set for this epoch
        self.final = False  # the average holds the last epoch and its BatchNorm statistics
        self._loaded: dict[str, Any] | None = None
        self._loader: Iterable | None = None
        self._training: dict[str, torch.Tensor] | None = None

    def check(self, trainer: Any, logged: set[str]) -> None:
        if self.start_epoch > trainer.epochs:
            raise SettingError("swa.start_epoch", f"{self.start_epoch} is after the last epoch ({trainer.epochs})")

    def on_fit_loaders(self, trainer: Any, train_loader: Iterable, val_loader: Iterable | None) -> None:
        self._loader = train_loader

    def on_fit_start(self, trainer: Any) -> None:
        from torch.optim.swa_utils import AveragedModel

        self.averaged = AveragedModel(trainer.raw_model)
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded.get("averaged") is not None:
            self.averaged.load_state_dict(loaded["averaged"])
            self.final = bool(loaded.get("final"))
            if loaded.get("swalr") is not None:
                self._make_swalr(trainer.optimizer, loaded["swalr"], loaded["lrs"])
        log.info("SWA: from epoch %d, LR annealed to %g over %d epoch(s); the last epoch is validated on the"
                 " averaged weights (BatchNorm recomputed)", self.start_epoch, self.lr, self.anneal_epochs)

    def _make_swalr(self, optimizer, state: dict[str, Any] | None = None, lrs: list[float] | None = None) -> None:
        from torch.optim.swa_utils import SWALR

        self.swalr = SWALR(optimizer, swa_lr=self.lr, anneal_epochs=self.anneal_epochs,
                           anneal_strategy=self.anneal_strategy)
        if state is not None:
            self.swalr.load_state_dict(state)
            self._set_lrs(optimizer, lrs)
        else:
            self.lrs = [g["lr"] for g in optimizer.param_groups]

    def _set_lrs(self, optimizer, lrs: list[float]) -> None:
        self.lrs = list(lrs)
        for group, lr in zip(optimizer.param_groups, self.lrs):
            group["lr"] = lr

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if epoch + 1 < self.start_epoch or trainer.loop.batch_in_epoch > 0:  # not yet, or resumed mid-epoch
            return
        if self.swalr is None:
            self._make_swalr(trainer.optimizer)
        else:
            self._set_lrs(trainer.optimizer, self.lrs)  # SWALR anneals from its own last LR, not the scheduler's
            self.swalr.step()
            self.lrs = [g["lr"] for g in trainer.optimizer.param_groups]

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        if self.lrs is None:
            return
        self._set_lrs(trainer.optimizer, self.lrs)  # after the run's scheduler stepped: SWALR's LR holds
        if info.last_in_epoch:
            self.averaged.update_parameters(trainer.raw_model)
            if info.epoch + 1 == trainer.epochs:
                self._finish(trainer)

    def _finish(self, trainer: Any) -> None:
        """BatchNorm statistics of the average, from the training batches (every RNG left as it was)."""
        from torch.optim.swa_utils import update_bn

        state = rng_state()
        try:
            inputs = (trainer.task.split_batch(trainer.placement.to_device(b))[0] for b in self._loader)
            update_bn(inputs, self.averaged)
        finally:
            set_rng_state(state)
        self.final = True
        log.info("SWA: %d epoch(s) averaged, BatchNorm statistics recomputed",
                 int(self.averaged.n_averaged.item()))

    def on_validation_start(self, trainer: Any, epoch: int) -> None:
        if self.final:
            self._training = put_weights(trainer.raw_model, self.averaged.module.state_dict())

    def on_validation_end(self, trainer: Any, epoch: int, record: dict[str, float], samples: list) -> None:
        if self._training is not None:
            put_weights(trainer.raw_model, self._training)
            self._training = None

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self.on_validation_end(trainer, -1, {}, [])

    def on_save_checkpoint(self, trainer: Any, state: dict[str, Any]) -> None:
        if self.final:
            n = int(self.averaged.n_averaged.item())
            state[AVERAGED] = {"kind": "swa", "weights": self.averaged.module.state_dict(), "epochs_averaged": n}

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        if self.averaged is not None and not self.final and self.swalr is not None:
            log.warning("SWA: the run ended before its last epoch; its checkpoints hold the training weights,"
                        " not the average")

    def state_dict(self) -> dict[str, Any]:
        if self.averaged is None:
            return {}
        return {"averaged": self.averaged.state_dict(), "final": self.final, "lrs": self.lrs,
                "swalr": self.swalr.state_dict() if self.swalr is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state or None
