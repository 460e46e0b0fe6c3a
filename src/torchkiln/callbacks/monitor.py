"""The one "did the monitored value improve" rule, and the callbacks that act on it."""

from __future__ import annotations

import logging
import math
from typing import Any

from torchkiln.engine.callbacks import Callback
from torchkiln.errors import ConfigError, SettingError, did_you_mean

log = logging.getLogger("torchkiln")


def improved(value: float | None, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in direction `mode` ("min" or "max");
    a non-finite value never improves, and any finite value beats no best at all."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def check_mode(mode: str | None, setting: str = "mode") -> str | None:
    """The one rule for a monitor's direction: min, max, or None (the task's default for the name)."""
    if mode not in (None, "min", "max"):
        raise SettingError(setting, f"expected min or max; found {mode!r}")
    return mode


class Monitor:
    """The run's monitored number: which one (`name`), which way is better (`mode`), by how much
    (`min_delta`). The best checkpoint, ReduceLROnPlateau and the summary follow it. A name or
    mode left out is chosen at fit start: the task's default for the metrics logged."""

    def __init__(self, name: str | None = None, mode: str | None = None, min_delta: float = 0.0):
        self.name = name
        self.mode = check_mode(mode)
        self.min_delta = float(min_delta)

    def resolve(self, task: Any, logged: list[str], has_val: bool) -> None:
        self.name = self.name or task.default_monitor(logged, has_val)
        self.mode = self.mode or task.monitor_mode(self.name)

    def check(self, logged: set[str]) -> None:
        """The monitored name is a number the run logs."""
        if self.name not in logged:
            raise SettingError("monitor", f"'{self.name}' will not be logged{did_you_mean(self.name, logged)}"
                                          f" (logged: {', '.join(sorted(logged))})")

    def value(self, record: dict[str, float]) -> float:
        if self.name not in record:
            raise SettingError("monitor", f"'{self.name}' is not logged; logged: {', '.join(sorted(record))}")
        return record[self.name]

    def update(self, record: dict[str, float], loop: Any) -> None:
        """Record this epoch's value in the loop state when it is the best so far (the checkpoint
        policy reads `loop.best_epoch`)."""
        value = self.value(record)
        if improved(value, loop.best, self.mode, self.min_delta):
            loop.best, loop.best_epoch = float(value), loop.epoch

    def describe(self) -> dict[str, Any]:
        return {"monitor": self.name, "mode": self.mode, "min_delta": self.min_delta}


class EarlyStopping(Callback):
    """Stop when `monitor` (default: the run's monitor) has not improved for `patience` epochs."""

    def __init__(self, patience: int, monitor: str | None = None, mode: str | None = None,
                 min_delta: float | None = None):
        if int(patience) < 1:
            raise SettingError("early_stop", f"expected a patience of at least 1 epoch; found {patience}")
        self.patience = int(patience)
        self.monitor, self.mode, self.min_delta = monitor, check_mode(mode, "EarlyStopping.mode"), min_delta
        self.best: float | None = None
        self.bad_epochs = 0

    def check(self, trainer: Any, logged: set[str]) -> None:
        if self.monitor is not None and self.monitor not in logged:
            raise ConfigError(f"EarlyStopping(monitor='{self.monitor}'): it will not be logged"
                              f"{did_you_mean(self.monitor, logged)} (logged: {', '.join(sorted(logged))})")

    def on_fit_start(self, trainer: Any) -> None:
        run = trainer.monitor
        self.monitor = self.monitor or run.name
        self.mode = self.mode or (run.mode if self.monitor == run.name else trainer.task.monitor_mode(self.monitor))
        self.min_delta = run.min_delta if self.min_delta is None else float(self.min_delta)

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, float]) -> None:
        if self.monitor not in record:
            raise SettingError("monitor", f"'{self.monitor}' is not logged; logged: {', '.join(sorted(record))}")
        value = record[self.monitor]
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.bad_epochs = float(value), 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            log.info("early stop: %s did not improve for %d epochs (best %.6g)", self.monitor, self.patience,
                     self.best if self.best is not None else float("nan"))
            trainer.stop_after_epoch()

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = state.get("best"), int(state.get("bad_epochs", 0))
