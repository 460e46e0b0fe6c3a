"""Which scheduler steps when: per optimizer step, per epoch, or on the monitored metric; warmup.

Skipped optimizer steps (fp16 overflow) never reach `on_optimizer_step`, so they never advance
the schedule.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.optim import lr_scheduler as L

from torchkiln.errors import SettingError, at_least, refuse_class

INTERVALS = ("step", "epoch")  # what a user may set; ReduceLROnPlateau's "metric" follows from its type
STEP_SCHEDULERS = ("OneCycleLR", "CyclicLR", "CosineAnnealingWarmRestarts")
METRIC_SCHEDULERS = ("ReduceLROnPlateau",)
# The attributes that fix a scheduler's length. When a checkpoint planned for another length is
# loaded (a run continued with more epochs), the plan of the scheduler built for this run is kept:
# the config the run resumes with describes its schedule, and the position (last_epoch) carries on.
PLAN_KEYS = {"OneCycleLR": ("total_steps", "_schedule_phases")}
log = logging.getLogger("torchkiln")


def default_interval(scheduler: Any) -> str:
    name = type(scheduler).__name__
    if name in METRIC_SCHEDULERS:
        return "metric"
    return "step" if name in STEP_SCHEDULERS else "epoch"


class LRSchedule:
    """Drives one torch scheduler (or none) plus an optional linear warmup on top of it.

    Warmup multiplies the scheduler's learning rate by a factor rising linearly from
    `warmup_start` to 1 over `warmup_steps` optimizer steps; the scheduler itself always sees
    its own, unwarmed learning rates, so warmup composes with any scheduler.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any | None = None,
        *,
        interval: str | None = None,
        monitor: str | None = None,
        warmup_steps: int = 0,
        warmup_start: float = 0.01,
        fractional_epochs: bool = True,
    ):
        refuse_class("optimizer", optimizer, "an optimizer", "model.parameters(), lr=...")
        refuse_class("scheduler", scheduler, "a scheduler", "optimizer, ...")
        if interval not in (None, *INTERVALS):
            raise SettingError("scheduler_interval", f"expected step (after each optimizer step) or epoch;"
                               f" found {interval!r} (leave it out to choose from the scheduler's type)")
        self.optimizer = optimizer
        self.scheduler = scheduler
        kind = default_interval(scheduler) if scheduler is not None else "epoch"
        if interval is not None and scheduler is not None:
            if kind == "metric" and interval == "step":
                raise SettingError(
                    "scheduler_interval", "ReduceLROnPlateau needs the monitored metric, which exists"
                    " only after validation; use interval: epoch (or leave it out)"
                )
            if kind != "metric":
                kind = interval
        self.interval = kind
        self.monitor = monitor
        self.warmup_steps = at_least("warmup_steps", warmup_steps, 0)
        self.warmup_start = float(warmup_start)
        self.fractional_epochs = fractional_epochs
        self.steps_done = 0
        self._base = [g["lr"] for g in self.param_groups]
        self._apply_warmup()

    # -- the two moments the trainer calls --------------------------------------------------
    def check_mode(self, monitor: str, mode: str, task: Any) -> None:
        """ReduceLROnPlateau cuts the LR when its number stops improving in ITS mode: a mode against
        the number's direction (torch's default 'min' on an accuracy) cuts it while the run improves."""
        if self.interval != "metric" or not hasattr(self.scheduler, "mode"):
            return
        name = self.monitor or monitor
        wanted = mode if name == monitor else task.monitor_mode(name)
        if self.scheduler.mode != wanted:
            raise SettingError(
                "scheduler", f"ReduceLROnPlateau(mode='{self.scheduler.mode}') steps on {name}, which is better"
                f" when {'higher' if wanted == 'max' else 'lower'}: it would cut the LR while {name} improves;"
                f" build it with mode='{wanted}'")

    def on_optimizer_step(self, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> None:
        """After a real (not skipped) optimizer step; `step_in_epoch` is 0-based."""
        self.steps_done += 1
        if self.scheduler is not None and self.interval == "step":
            self._restore()
            if isinstance(self.scheduler, L.CosineAnnealingWarmRestarts) and self.fractional_epochs:
                self.scheduler.step(epoch + step_in_epoch / max(1, steps_per_epoch))
            else:
                self.scheduler.step()
            self._base = [g["lr"] for g in self.optimizer.param_groups]
        self._apply_warmup()

    def on_epoch_end(self, metrics: dict[str, float], monitor: str | None = None) -> None:
        """After each epoch; ReduceLROnPlateau steps on `metrics[monitor]` (this schedule's own
        `monitor` when it was given one, else the run's)."""
        if self.scheduler is None or self.interval == "step":
            return
        self._restore()
        if self.interval == "metric":
            monitor = self.monitor or monitor
            if monitor not in metrics:
                raise SettingError(
                    "monitor", f"ReduceLROnPlateau needs '{monitor}', which this run does not log;"
                    f" logged: {', '.join(sorted(metrics))}"
                )
            self.scheduler.step(metrics[monitor])
        else:
            self.scheduler.step()
        self._base = [g["lr"] for g in self.optimizer.param_groups]
        self._apply_warmup()

    # -- warmup ----------------------------------------------------------------------------
    def warmup_factor(self) -> float:
        if self.steps_done >= self.warmup_steps:
            return 1.0
        return self.warmup_start + (1.0 - self.warmup_start) * self.steps_done / self.warmup_steps

    def _restore(self) -> None:
        if not self.warmup_steps:  # without warmup the groups hold the scheduler's own rates already
            return  # (and a learning rate a callback set is left for the scheduler to see)
        for g, lr in zip(self.optimizer.param_groups, self._base):
            g["lr"] = lr

    def _apply_warmup(self) -> None:
        if not self.warmup_steps:
            return
        factor = self.warmup_factor()
        for g, lr in zip(self.optimizer.param_groups, self._base):
            g["lr"] = lr * factor

    def _log_replan(self, old: dict[str, Any]) -> None:
        sched, step = self.scheduler, int(self.scheduler.last_epoch)
        total, was = getattr(sched, "total_steps", None), old.get("total_steps")
        nxt = _one_cycle_lr(sched, step + 1)
        log.info("scheduler %s: re-planned for %s steps (the checkpoint planned %s); continuing at step %d"
                 " with lr %.3g%s", type(sched).__name__, total, was, step,
                 self.optimizer.param_groups[0]["lr"],
                 f", then the new plan's lr {nxt:.3g} at step {step + 1}" if nxt is not None else "")

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups if self.optimizer is not None else []  # no optimizer: predict only

    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.param_groups]

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "steps_done": self.steps_done,
            "base": list(self._base),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None and state.get("scheduler") is not None:
            keys = PLAN_KEYS.get(type(self.scheduler).__name__, ())
            plan = {k: getattr(self.scheduler, k) for k in keys if hasattr(self.scheduler, k)}
            self.scheduler.load_state_dict(state["scheduler"])
            old = {k: getattr(self.scheduler, k) for k in plan}
            if old != plan:
                self.scheduler.__dict__.update(plan)
                self._log_replan(old)
        self.steps_done = int(state["steps_done"])
        self._base = list(state["base"])
        self._apply_warmup()


def _one_cycle_lr(sched: Any, step: int) -> float | None:
    """OneCycleLR's learning rate of the first param group at `step`, read off its phases without
    stepping it (stepping would also set momentum)."""
    phases = getattr(sched, "_schedule_phases", None)
    if not phases or not hasattr(sched, "_anneal_func") or step > sched.total_steps:
        return None
    group, start = sched.optimizer.param_groups[0], 0.0
    for i, phase in enumerate(phases):
        end = phase["end_step"]
        if step <= end or i == len(phases) - 1:
            pct = (step - start) / (end - start) if end > start else 1.0
            return float(sched._anneal_func(group[phase["start_lr"]], group[phase["end_lr"]], pct))
        start = end
    return None
