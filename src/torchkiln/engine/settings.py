"""`make_trainer`: the usual parts built from keyword settings, for people who have their own data
and model and want the loop's mechanics in one call. The keywords are the config's `trainer`
settings (plus the scheduler, metrics and loggers); `kiln train` builds its Trainer through this
too, so each setting is read in one place: here, by the part it belongs to.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.callbacks.checkpointing import Checkpointing
from torchkiln.callbacks.ema import EMA
from torchkiln.callbacks.freezing import FreezeSchedule
from torchkiln.callbacks.memory import MemoryReport, MemorySnapshot
from torchkiln.callbacks.monitor import EarlyStopping, Monitor
from torchkiln.callbacks.notebook import NotebookSupport
from torchkiln.callbacks.progress import DeviceStatsMonitor, ProgressBar
from torchkiln.callbacks.swa import SWA
from torchkiln.callbacks.training_checks import TrainingChecks
from torchkiln.engine.callbacks import Callback, as_callbacks
from torchkiln.engine.finite import FiniteCheck
from torchkiln.engine.fsdp import FSDPSettings
from torchkiln.engine.memory import checkpoint_modules
from torchkiln.engine.oom import OOMRecovery
from torchkiln.engine.placement import Placement
from torchkiln.engine.schedule import LRSchedule
from torchkiln.engine.step import OptimizerStep
from torchkiln.engine.trainer import Trainer
from torchkiln.loggers.base import Logger
from torchkiln.notebook import in_notebook


def make_trainer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module | None = None,
    *,
    task: Any | None = None,
    metrics: Any | None = None,
    train_metrics: bool = True,
    epochs: int = 10,
    # the optimizer step
    precision: str = "32",
    grad_clip: float | None = None,
    grad_clip_mode: str = "norm",
    accumulate: int = 1,
    scaler_options: dict[str, Any] | None = None,
    on_oom: str | OOMRecovery = "stop",
    # memory
    activation_checkpointing: list[str] | None = None,
    leak_watch: int | None = 10,
    memory_snapshot: int | None = None,
    # the LR schedule
    scheduler: Any | None = None,
    scheduler_interval: str | None = None,
    scheduler_fractional_epochs: bool = True,
    warmup_steps: int = 0,
    warmup_start: float = 0.01,
    # the placement
    device: str | torch.device | None = None,
    channels_last: bool = False,
    compile: bool = False,
    compile_options: dict[str, Any] | None = None,
    cache_size_limit: int | None = None,
    strategy: str = "auto",
    sync_batchnorm: bool = False,
    fsdp: dict[str, Any] | None = None,
    # the monitor and early stopping
    monitor: str | None = None,
    mode: str | None = None,
    min_delta: float = 0.0,
    early_stop: int | None = None,
    # checkpoints
    run_dir: str | Path | None = None,
    save_period: int | None = None,
    checkpoint_every_steps: int | None = None,
    keep_last: int | None = None,
    async_checkpoints: bool = True,
    config: dict[str, Any] | None = None,
    # checks and weight averaging (callbacks/training_checks.py, ema.py, swa.py)
    checks: str = "warn",
    ema: dict[str, Any] | None = None,
    swa: dict[str, Any] | None = None,
    # the rest of the loop
    freezer: Any | None = None,
    on_nonfinite: str = "stop",
    progress: bool = True,
    log_every_n_steps: int = 10,
    callbacks: Callback | Iterable[Callback] = (),
    loggers: Iterable[Logger] = (),
) -> Trainer:
    """A Trainer from settings: `run_dir` None writes nothing (checkpoints start once a command
    calls `trainer.use_run_dir`); `progress` shows a bar on a terminal."""
    placement = Placement(device, channels_last=channels_last, compile=compile, compile_options=compile_options,
                          cache_size_limit=cache_size_limit, strategy=strategy, sync_batchnorm=sync_batchnorm,
                          fsdp=FSDPSettings.from_dict(fsdp, precision) if strategy == "fsdp" else None)
    step = OptimizerStep(precision=precision, grad_clip=grad_clip, grad_clip_mode=grad_clip_mode,
                         accumulate=accumulate, scaler_options=scaler_options, on_oom=on_oom)
    checkpoint_modules(model, activation_checkpointing)
    schedule = LRSchedule(optimizer, scheduler, interval=scheduler_interval, monitor=monitor, warmup_steps=warmup_steps,
                          warmup_start=warmup_start, fractional_epochs=scheduler_fractional_epochs)
    checkpoints = Checkpointing(run_dir, save_period=save_period, every_n_steps=checkpoint_every_steps,
                                keep_last=keep_last, background=async_checkpoints, config=config)
    parts = _builtin_callbacks(freezer=freezer, log_every_n_steps=log_every_n_steps, leak_watch=leak_watch,
                               memory_snapshot=memory_snapshot, progress=progress, checks=checks, ema=ema,
                               swa=swa, early_stop=early_stop)
    return Trainer(
        model, optimizer, loss_fn, task=task, metrics=metrics, train_metrics=train_metrics, epochs=epochs,
        step=step, schedule=schedule, placement=placement, monitor=Monitor(monitor, mode, min_delta),
        checkpoints=checkpoints, callbacks=[*parts, *as_callbacks(callbacks)], loggers=loggers,
        on_nonfinite=FiniteCheck(on_nonfinite), log_every_n_steps=log_every_n_steps,
    )


def _builtin_callbacks(*, freezer: Any | None, log_every_n_steps: int, leak_watch: int | None,
                       memory_snapshot: int | None, progress: bool, checks: str, ema: dict[str, Any] | None,
                       swa: dict[str, Any] | None, early_stop: int | None) -> list[Callback]:
    """The built-in callbacks the settings ask for, in the order they run (before the user's)."""
    parts: list[Callback] = [FreezeSchedule(freezer)] if freezer is not None else []
    parts.append(DeviceStatsMonitor(log_every_n_steps))
    parts.append(MemoryReport(leak_watch))
    if memory_snapshot:
        parts.append(MemorySnapshot(memory_snapshot))
    if progress:
        parts.append(ProgressBar(every_n_steps=log_every_n_steps))
    if checks != "off":
        parts.append(TrainingChecks(checks))
    if ema is not None:
        parts.append(EMA(**ema))
    if swa is not None:
        parts.append(SWA(**swa))
    if early_stop is not None:
        parts.append(EarlyStopping(early_stop))
    if in_notebook():
        parts.append(NotebookSupport())
    return parts
