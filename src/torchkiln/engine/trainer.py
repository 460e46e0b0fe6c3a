"""The loop: fit / evaluate / predict, reading like the textbook loop; mechanics are one call away.

The Trainer takes built parts: the model, optimizer and loss; the optimizer step (precision,
clipping, accumulation), the LR schedule, the placement (device, compile, DDP), the monitor and
the checkpoint policy; callbacks and loggers. Constructing it has no side effects, and nothing is
written unless a checkpoint policy or a logger says where. `torchkiln.make_trainer` builds the
usual parts from keyword settings.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln import gcpause
from torchkiln.callbacks.checkpointing import Checkpointing
from torchkiln.callbacks.freezing import FreezeSchedule
from torchkiln.callbacks.logging_hub import LoggerHub
from torchkiln.callbacks.monitor import EarlyStopping, Monitor
from torchkiln.data.loaders import check_sized, epoch_batch_sizes, set_loader_epoch
from torchkiln.engine import checkpoint, distributed
from torchkiln.engine.callbacks import Callback, CallbackList, StepInfo, as_callbacks
from torchkiln.engine.device import cat_outputs, to_cpu
from torchkiln.engine.finite import FiniteCheck
from torchkiln.engine.placement import Placement, move_optimizer_state
from torchkiln.engine.schedule import LRSchedule
from torchkiln.engine.state import LoopState, StopRequested
from torchkiln.engine.step import AccumulationGroups, OptimizerStep
from torchkiln.engine.totals import EpochTotals, clone_metrics
from torchkiln.errors import CheckpointError, SettingError, TrainingError, at_least, refuse_class
from torchkiln.loggers.base import Logger
from torchkiln.loggers.validation import ValidationCollector, merge_samples
from torchkiln.rundir import resume_file
from torchkiln.seeding import fingerprint, rng_state, set_rng_state
from torchkiln.tasks.base import ClassificationTask, Task
from torchkiln.version import __version__

log = logging.getLogger("torchkiln")


class Trainer:
    """Train a model with mixed precision, clipping, accumulation, schedules and checkpoints."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,  # None: evaluate and predict only
        loss_fn: nn.Module | None = None,
        *,
        task: Task | None = None,
        metrics: Any | None = None,
        train_metrics: bool = True,
        epochs: int = 10,
        step: OptimizerStep | None = None,
        schedule: LRSchedule | Any | None = None,
        placement: Placement | None = None,
        monitor: Monitor | str | None = None,
        checkpoints: Checkpointing | str | Path | None = None,
        callbacks: Callback | Iterable[Callback] = (),
        loggers: Iterable[Logger] = (),
        on_nonfinite: FiniteCheck | str = "stop",
        log_every_n_steps: int = 10,
    ):
        refuse_class("optimizer", optimizer, "an optimizer", "model.parameters(), lr=...")
        refuse_class("loss_fn", loss_fn, "a loss", "")
        self.raw_model = model  # the user's module: its weights are what checkpoints hold
        self.optimizer = optimizer
        self.task = task or ClassificationTask()
        self.loss_fn = loss_fn if loss_fn is not None else self.task.make_loss(None)
        self.epochs = at_least("epochs", epochs, 0)
        self.placement = (placement or Placement()).adopt(model)  # a model that places itself keeps its devices
        self.stepper = (step or OptimizerStep()).bind(optimizer, self.placement.device)
        self.schedule = schedule if isinstance(schedule, LRSchedule) else LRSchedule(optimizer, schedule)
        self.monitor = monitor if isinstance(monitor, Monitor) else Monitor(monitor)
        self.checkpointing = Checkpointing(checkpoints) if isinstance(checkpoints, (str, Path)) else checkpoints
        self.finite = on_nonfinite if isinstance(on_nonfinite, FiniteCheck) else FiniteCheck(on_nonfinite)
        self.log_every_n_steps = max(1, int(log_every_n_steps))
        self.val_metrics = clone_metrics(metrics, "val/")
        self.train_metrics = clone_metrics(metrics, "train/") if train_metrics else None
        self.hub = LoggerHub(loggers, self.log_every_n_steps)
        self.callbacks = CallbackList(self._with_parts(as_callbacks(callbacks)))
        self.loop = LoopState()
        self.initial_fingerprint: str | None = None
        self.compile_report: dict[str, Any] | None = None
        self.resumed = False
        self.batches_in_epoch = 0
        self.stopping: int | None = None  # the stop request every rank acts on (a signal number)
        self._stop_signal: int | None = None
        self._loaded_state: dict[str, Any] | None = None  # the state dict load_state_dict last applied
        self._totals: EpochTotals | None = None
        self._epoch_accum: dict[str, Any] | None = None  # a mid-epoch checkpoint's sums, until used
        self._epoch_started, self._epoch_samples = 0.0, 0

    def _with_parts(self, user: list[Callback]) -> list[Callback]:
        """The parts' callbacks around the user's: freezing first; the loggers, early stopping and
        checkpointing last (a checkpoint holds what every other callback did at that moment)."""
        if any(isinstance(cb, Checkpointing) for cb in user):
            raise SettingError("callbacks", "a Checkpointing callback is the checkpoint policy: give it as"
                               " checkpoints=..., not in callbacks (two policies would write the same files)")
        freezing = [cb for cb in user if isinstance(cb, FreezeSchedule)]
        rest = [cb for cb in user if not isinstance(cb, FreezeSchedule)]
        early = [cb for cb in rest if isinstance(cb, EarlyStopping)]
        rest = [cb for cb in rest if cb not in early]
        return [*freezing, *rest, self.hub, *early, *([self.checkpointing] if self.checkpointing else [])]

    # -- set-up ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def model(self) -> nn.Module:
        """What training calls: the placement's (compiled, distributed) model once set up, else `raw_model`."""
        return self.placement.train_model if self.placement.ready else self.raw_model

    @property
    def skipped_steps(self) -> int:
        return self.stepper.skipped

    @property
    def defer_finite_check(self) -> bool | None:
        return self.finite.defer

    @defer_finite_check.setter
    def defer_finite_check(self, value: bool | None) -> None:
        self.finite.defer = value

    def setup(self) -> None:
        """Put the model, loss and metrics on the device (compiled, wrapped); once."""
        if self.placement.ready:
            return
        self.placement.setup(self.raw_model, (self.loss_fn, self.val_metrics, self.train_metrics), self.optimizer)
        self.callbacks.active(distributed.is_rank0())  # rank duties: only rank 0 logs and shows progress

    def use_run_dir(self, run_dir: str | Path, loggers: Iterable[Logger] = ()) -> None:
        """Checkpoints go into `run_dir`, the run's numbers to `loggers` too (a command builds and
        checks the Trainer first, then makes the run directory and calls this)."""
        if self.checkpointing is not None:
            self.checkpointing.use_dir(run_dir)
        self.hub.add(loggers)

    def logged_names(self, has_val: bool) -> set[str]:
        names = {"train/loss"}
        if has_val:
            names.add("val/loss")
            names.update(self.val_metrics.keys() if self.val_metrics is not None else [])
        if self.train_metrics is not None:
            names.update(self.train_metrics.keys())
        return names

    def resolve_monitor(self, has_val: bool) -> None:
        """Choose the monitor's defaults and check that it names a number this run logs."""
        watched = self.val_metrics if has_val else self.train_metrics
        self.monitor.resolve(self.task, list(watched.keys(keep_base=True)) if watched is not None else [], has_val)
        logged = self.logged_names(has_val)
        self.monitor.check(logged)
        self.schedule.check_mode(self.monitor.name, self.monitor.mode, self.task)
        self.callbacks.call("check", self, logged)

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable, val_loader: Iterable | None = None,
            resume: str | Path | dict | None = None) -> dict[str, Any]:
        """Train for `epochs`, continuing from `resume` (a checkpoint path, a run directory's
        last.ckpt, or a loaded checkpoint dict). A second fit of the same Trainer continues the
        first: its epochs, steps, history and best go on (raise `epochs` to train longer)."""
        if self.optimizer is None:
            raise SettingError("optimizer", "fit needs an optimizer (evaluate and predict do not)")
        check_sized(train_loader, "train_loader")
        started = time.perf_counter()
        self.setup()
        self.resolve_monitor(val_loader is not None)
        self.callbacks.call("on_fit_loaders", self, train_loader, val_loader)
        self._start(resume)
        try:
            for epoch in range(self.loop.epoch, self.epochs):
                if self.loop.stopped_early:  # resumed from the checkpoint of an early stop
                    break
                record = self._train_epoch(epoch, train_loader)
                if val_loader is not None:
                    record.update(self._validate(epoch, val_loader))
                self._end_epoch(epoch, distributed.broadcast_object(record))  # rank 0's numbers decide
                self._stop_if_requested(force=True)
                if self.loop.stopped_early:
                    break
        except BaseException as exc:
            if not self.callbacks.handled(self, exc):  # a callback may end the run here (Ctrl-C in a notebook)
                raise
        finally:
            self.compile_report = self.placement.compile_report()
            summary = self.summary(time.perf_counter() - started)
            self.callbacks.finish(self, summary)
        return summary

    def _start(self, resume: str | Path | dict | None) -> None:
        loop = self.loop
        continuing = resume is None and (loop.global_step > 0 or loop.epoch > 0)  # a second fit of this Trainer
        self.resumed = resume is not None or continuing
        if resume is not None and resume is not self._loaded_state:  # the train command loads (and checks) it first
            self.load_state_dict(resume if isinstance(resume, dict) else checkpoint.load_checkpoint(resume_file(resume), self.device))
        if continuing:
            loop.check_continuation(self.epochs)
        elif self.resumed:
            log.info("resumed at epoch %d, step %d (batch %d of the epoch)", self.loop.epoch + 1,
                     self.loop.global_step, self.loop.batch_in_epoch)
        else:
            self.loop, self._epoch_accum = LoopState(), None
            self.initial_fingerprint = fingerprint(self.raw_model)
        self.callbacks.call("on_fit_start", self)
        gcpause.resume()  # the CLI's set-up is done (a no-op elsewhere)
        total = sum(p.numel() for p in self.raw_model.parameters())
        trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        log.info("device %s, precision %s, %d parameters (%d trainable, %d frozen)", self.device,
                 self.stepper.precision, total, trainable, total - trainable)
        log.info("initial-parameter fingerprint %s", self.initial_fingerprint)

    def _train_epoch(self, epoch: int, loader: Iterable) -> dict[str, float]:
        loop, stepper = self.loop, self.stepper
        self._epoch_started = time.perf_counter()
        self.batches_in_epoch = n_batches = len(loader)  # type: ignore[arg-type]
        start = loop.batch_in_epoch
        set_loader_epoch(loader, epoch, skip=start)
        self._begin_totals()
        self.finite.start_epoch(self.device, scaled=stepper.scaler is not None)
        self.callbacks.call("on_epoch_start", self, epoch)
        groups = AccumulationGroups(stepper.accumulate, n_batches, epoch_batch_sizes(loader, n_batches))
        model = self.placement.train_model  # after on_epoch_start: freezing may have rewrapped it
        model.train()
        self._epoch_samples = 0
        for i, batch in enumerate(loader, start=start):
            batch = self.placement.to_device(batch)
            n, last = self.task.batch_size(batch), groups.last(i)
            loss, used = stepper.oom.run(self, model, batch, i, groups.weight(i), last, self._totals)  # engine/oom.py
            groups.used = groups.used or used
            loop.batch_in_epoch, self._epoch_samples = i + 1, self._epoch_samples + n
            self.callbacks.call("on_train_batch_end", self, i, n)
            if last:
                self._end_group(epoch, i, loss, groups, n_batches)
        self.finite.flush()  # before anything of this epoch is validated, logged or saved
        if self._totals.count == 0:
            raise TrainingError(f"epoch {epoch + 1} had no usable batch (empty loader or every loss non-finite)")
        return self._totals.result("train")

    def _end_group(self, epoch: int, i: int, loss: torch.Tensor, groups: AccumulationGroups, n_batches: int) -> None:
        """The optimizer step that ends a group of micro-batches (none if each of them was skipped)."""
        used, groups.used = groups.used, False
        self.stepper.oom.end_group(self, used)
        if not used:
            self.optimizer.zero_grad(set_to_none=True)
            return
        lrs = self.schedule.lrs()  # the learning rates this step uses
        result = self.stepper.step(want_norm=self.hub.wants_steps)
        self.loop.global_step += 1
        step, k = self.loop.global_step, self.stepper.accumulate
        if result.stepped:
            self.schedule.on_optimizer_step(epoch, i // k, math.ceil(n_batches / k))
        else:
            log.info("step %d skipped by the fp16 GradScaler (inf/NaN gradients; scale now %g);"
                     " the LR schedule did not advance (%d skipped so far)", step,
                     self.stepper.scaler.get_scale(), self.stepper.skipped)
        if step % self.log_every_n_steps == 0:
            self.finite.flush()
        last_in_epoch = i + 1 >= n_batches
        self.stopping = None if last_in_epoch else self._agreed_stop()
        info = StepInfo(epoch, step, i, loss.detach(), result.grad_norm, lrs, result.stepped, last_in_epoch)
        self.callbacks.call("on_step_end", self, info)
        self._stop_if_requested()

    def _begin_totals(self) -> None:
        if self._totals is None:
            self._totals = EpochTotals(self.task, self.train_metrics, self.device)
        if self._epoch_accum and self.loop.batch_in_epoch > 0:  # resumed mid-epoch
            self._totals.load_state_dict(self._epoch_accum)
        else:
            self._totals.reset()
        self._epoch_accum = None

    def _end_epoch(self, epoch: int, record: dict[str, float]) -> None:
        loop = self.loop
        for i, lr in enumerate(self.schedule.lrs()):
            record[f"lr/group{i}"] = lr
        loop.epoch, loop.batch_in_epoch = epoch + 1, 0
        self.schedule.on_epoch_end(record, self.monitor.name)
        self.monitor.update(record, loop)
        loop.history.append(dict(record))
        seconds = time.perf_counter() - self._epoch_started  # training and validation
        record.update({"time/epoch_s": seconds, "time/samples_per_s": self._epoch_samples / max(seconds, 1e-9)})
        self.callbacks.call("on_epoch_end", self, epoch, record)

    # -- stopping -------------------------------------------------------------------------------
    def request_stop(self, signum: int | None) -> None:
        """Finish the current optimizer step, write a checkpoint, then raise StopRequested (None: withdraw)."""
        self._stop_signal = signum

    @property
    def stop_requested(self) -> int | None:
        return self._stop_signal

    def stop_after_epoch(self) -> None:
        """End the run after this epoch (early stopping); the checkpoints written then record it."""
        self.loop.stopped_early = True

    def _agreed_stop(self, force: bool = False) -> int | None:
        """The stop request every rank acts on (a signal number), else None. In one process it is
        this process's own request, at once. Under DDP the ranks agree on it (an all-reduce, a
        device sync on NCCL) only every `log_every_n_steps` optimizer steps and at each epoch's
        end (`force`): a request waits for the next of those, all ranks then stop after the same
        step, and the steps in between pay no collective."""
        if not distributed.is_distributed():
            return self._stop_signal
        if not force and self.loop.global_step % self.log_every_n_steps:
            return None
        return distributed.any_rank(self._stop_signal, self.device)

    def _stop_if_requested(self, force: bool = False) -> None:
        stop = self._agreed_stop(force=True) if force else self.stopping
        if stop is not None:
            path = self.checkpointing.last if self.checkpointing is not None else None
            raise StopRequested(stop, str(path) if path is not None else None)

    # -- evaluation -----------------------------------------------------------------------------
    def forward_pass(self, loader: Iterable) -> Iterator[tuple[Any, Any, Any]]:
        """(batch, outputs, targets) for every batch of `loader`: the one forward pass of evaluation,
        prediction and reports (eval mode, inference mode, autocast, on the device, without DDP)."""
        self.setup()  # outside inference_mode: parameters moved there would become inference tensors
        model = self.placement.eval_model
        model.eval()
        with torch.inference_mode():
            for batch in loader:
                batch = self.placement.to_device(batch)
                with self.stepper.autocast():
                    outputs, targets = self.task.forward(model, batch)
                yield batch, outputs, targets

    def evaluate(self, loader: Iterable, prefix: str = "val",
                 collector: ValidationCollector | None = None) -> dict[str, float]:
        """Loss and metrics over every sample of `loader`, keyed `<prefix>/<name>`."""
        totals, batch = EpochTotals(self.task, self.val_metrics, self.device), None
        for batch, outputs, targets in self.forward_pass(loader):
            if targets is not None:
                with self.stepper.autocast():
                    loss = self.task.loss(self.loss_fn, outputs, targets)
                totals.add(loss, self.task.batch_size(batch), outputs, targets)
            if collector is not None:
                collector.update(self.task.split_batch(batch)[0], outputs, targets)
        if batch is None:
            raise TrainingError(f"the {prefix} loader gave no samples: give it at least one batch (an empty dataset?"
                                " drop_last with fewer samples than one batch?)")
        return totals.result(prefix)

    def _validate(self, epoch: int, loader: Iterable) -> dict[str, float]:
        """Validation; callbacks that ask to see its outputs this epoch get them (and only then).
        Under DDP only rank 0 has loggers, but every rank holds a shard of the validation set:
        all ranks collect when rank 0 asks, and rank 0 gets the union."""
        wanted = distributed.broadcast_object(self.callbacks.sample_count(self, epoch))
        collector = ValidationCollector.of(self.task, wanted) if wanted is not None else None
        self.callbacks.call("on_validation_start", self, epoch)
        record = self.evaluate(loader, "val", collector)
        samples = collector.result() if collector is not None else []
        if collector is not None and distributed.is_distributed():
            samples = merge_samples(distributed.gather_objects(samples), wanted)
        self.callbacks.call("on_validation_end", self, epoch, record, samples)
        return record

    def validate(self, loader: Iterable) -> dict[str, float]:
        return self.evaluate(loader, "val")

    def test(self, loader: Iterable) -> dict[str, float]:
        return self.evaluate(loader, "test")

    def predict(self, loader: Iterable) -> torch.Tensor | dict[str, torch.Tensor]:
        """Model outputs for every batch, concatenated on the CPU; a model that returns a dict (one
        entry per head) gives a dict of the same keys, each concatenated over the batches."""
        return cat_outputs([to_cpu(outputs) for _, outputs, _ in self.forward_pass(loader)])

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as plain data (loadable with weights_only=True).

        Under DDP this is a collective (each rank's RNG and partial epoch sums go to `ranks`):
        call it on every rank.
        """
        self.finite.flush()  # weights after a non-finite loss are never saved
        mid_epoch = self.loop.batch_in_epoch > 0 and self._totals is not None
        accum = self._totals.state_dict() if mid_epoch else None
        rng = rng_state()
        state = {
            "format": checkpoint.FORMAT, "version": 1, "torchkiln": __version__, "torch": str(torch.__version__),
            "model": checkpoint.strip_prefixes(self.raw_model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "step": self.stepper.state_dict(),
            "loop": self.loop.to_dict(),
            "callbacks": self.callbacks.state_dict(),
            "epoch_accum": accum,
            "rng": rng,
            "ranks": distributed.gather_rank_states({"rng": rng, "epoch_accum": accum}),
            "fingerprint": self.initial_fingerprint,
            "config": None,
        }
        self.callbacks.call("on_save_checkpoint", self, state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != checkpoint.FORMAT:
            raise CheckpointError("not a torchkiln checkpoint (use model.pretrained for plain weights)")
        self.load_weights(state["model"])
        checkpoint.check_optimizer_state(self.optimizer, state["optimizer"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"optimizer state does not fit this optimizer: {exc}") from exc
        move_optimizer_state(self.optimizer, self.device)
        self.schedule.load_state_dict(state["schedule"])
        self.stepper.load_state_dict(state["step"])
        self.loop = LoopState.from_dict(state["loop"])
        self.callbacks.load_state_dict(state.get("callbacks") or {})
        own = distributed.own_rank_state(state, mid_epoch=self.loop.batch_in_epoch > 0) or state
        self._epoch_accum = own.get("epoch_accum")
        self.initial_fingerprint = state.get("fingerprint")
        set_rng_state(own["rng"])
        self._loaded_state = state
        self.callbacks.call("on_load_checkpoint", self, state)

    def load_weights(self, weights: dict[str, torch.Tensor], strict: bool = True) -> None:
        checkpoint.load_model_weights(self.raw_model, weights, strict)

    def summary(self, seconds: float | None = None) -> dict[str, Any]:
        loop = self.loop
        return {
            "epochs_completed": loop.epoch,
            "global_step": loop.global_step,
            "monitor": self.monitor.name,
            "mode": self.monitor.mode,
            "best": loop.best,
            "best_epoch": loop.best_epoch,
            "stopped_early": loop.stopped_early,
            "skipped_steps": self.stepper.skipped,
            "oom_recoveries": self.stepper.oom.recoveries,
            "compile": self.compile_report,
            "final": loop.history[-1] if loop.history else {},
            "fingerprint": self.initial_fingerprint,
            "seconds": seconds,
        }
