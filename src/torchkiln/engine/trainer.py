"""The loop: fit / validate / test / predict. Reads like the textbook loop; mechanics are one call away.

The Trainer takes plain objects (model, optimizer, loss, loaders, optional scheduler and metrics)
and no files; a `run_dir` turns on checkpoints. Constructing it has no side effects.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.data.loaders import epoch_batch_sizes, set_loader_epoch
from torchkiln.engine import distributed
from torchkiln.engine.checkpoint import (
    FORMAT,
    CheckpointWriter,
    clean_stale_temps,
    load_checkpoint,
    strip_prefixes,
)
from torchkiln.engine.device import move_to, resolve_device
from torchkiln.engine.metric_buffer import MetricBuffer
from torchkiln.engine.schedule import LRSchedule
from torchkiln.engine.state import LoopState, StopRequested
from torchkiln.engine.step import OptimizerStep, is_finite
from torchkiln.errors import CheckpointError, ConfigError, TrainingError
from torchkiln.loggers.base import Logger
from torchkiln.loggers.device import DeviceStats
from torchkiln.loggers.progress import Progress
from torchkiln.loggers.validation import ValidationCollector, merge_samples
from torchkiln.seeding import fingerprint, rng_state, set_rng_state
from torchkiln.tasks.base import ClassificationTask, Task
from torchkiln.version import __version__

log = logging.getLogger("torchkiln")


class Trainer:
    """Train a model with mixed precision, clipping, accumulation, schedules and checkpoints."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module | None = None,
        *,
        task: Task | None = None,
        scheduler: Any | None = None,
        scheduler_interval: str | None = None,
        scheduler_fractional_epochs: bool = True,
        warmup_steps: int = 0,
        warmup_start: float = 0.01,
        metrics: Any | None = None,
        train_metrics: bool = True,
        epochs: int = 10,
        device: str | torch.device | None = None,
        precision: str = "32",
        grad_clip: float | None = None,
        grad_clip_mode: str = "norm",
        accumulate: int = 1,
        monitor: str | None = None,
        mode: str | None = None,
        early_stop: int | None = None,
        min_delta: float = 0.0,
        run_dir: str | Path | None = None,
        save_period: int | None = None,
        checkpoint_every_steps: int | None = None,
        keep_last: int | None = None,
        async_checkpoints: bool = True,
        loggers: Iterable[Logger] = (),
        progress: bool = True,
        log_every_n_steps: int = 10,
        on_nonfinite: str = "stop",
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
        cache_size_limit: int | None = None,
        scaler_options: dict[str, Any] | None = None,
        channels_last: bool = False,
        strategy: str = "auto",
        sync_batchnorm: bool = False,
        config: dict[str, Any] | None = None,
        freezer: Any | None = None,
    ):
        self.model = model
        self.raw_model = model
        self.optimizer = optimizer
        self.task = task or ClassificationTask()
        self.loss_fn = loss_fn if loss_fn is not None else self.task.make_loss(None)
        self.scheduler = scheduler
        self.epochs = int(epochs)
        self.device = resolve_device(device)
        self.channels_last = channels_last
        self.monitor = monitor
        self.mode = mode
        self.early_stop = early_stop
        self.min_delta = float(min_delta)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.save_period = save_period
        self.checkpoint_every_steps = checkpoint_every_steps
        self.keep_last = keep_last
        # Checkpoints are serialized on this thread and written (bytes, fsync, rename, second
        # names) behind it, in order, by default: the write is mostly waiting on the disk. Measured
        # on 2 CPU cores (training 8 steps after a best+last checkpoint of the default model):
        # 5.4 ms inline, 3.2 ms with the write behind; serializing alone costs about 1.5 ms.
        self.checkpoints = CheckpointWriter(background=async_checkpoints)
        self.loggers = list(loggers)
        self.progress = Progress(enabled=progress)
        self.device_stats = DeviceStats(self.device)
        self.log_every_n_steps = max(1, int(log_every_n_steps))
        if on_nonfinite not in ("stop", "skip_batch"):
            raise ConfigError(f"trainer.on_nonfinite: expected stop or skip_batch; found {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.compile = compile
        self.compile_options = dict(compile_options or {})
        self.cache_size_limit = cache_size_limit
        self.compile_report: dict[str, Any] | None = None
        self._dynamo_before: dict[str, Any] | None = None
        self.strategy = strategy
        self.sync_batchnorm = sync_batchnorm
        self.config = config
        self.freezer = freezer  # models.freeze.Freezer: set_epoch(epoch) freezes/unfreezes for that epoch
        self.stepper = OptimizerStep(
            optimizer,
            device=self.device,
            precision=str(precision),
            grad_clip=grad_clip,
            grad_clip_mode=grad_clip_mode,
            accumulate=accumulate,
            scaler_options=scaler_options,
        )
        self.schedule = LRSchedule(
            optimizer,
            scheduler,
            interval=scheduler_interval,
            monitor=monitor,
            warmup_steps=warmup_steps,
            warmup_start=warmup_start,
            fractional_epochs=scheduler_fractional_epochs,
        )
        self.val_metrics = self._clone_metrics(metrics, "val/")
        self.train_metrics = self._clone_metrics(metrics, "train/") if train_metrics else None
        self._train_buffer = MetricBuffer(self.task, self.train_metrics)
        self.loop = LoopState()
        self.initial_fingerprint: str | None = None
        self._stop_signal: int | None = None
        self._step_rows: list[tuple[int, dict[str, Any]]] = []
        # On an accelerator the non-finite-loss check of `on_nonfinite: stop` is deferred: the
        # losses are kept on the device and checked with one sync per log interval and before
        # anything is saved or validated, instead of a sync every step (None: defer off the CPU).
        self.defer_finite_check: bool | None = None
        self._loaded_state: dict[str, Any] | None = None  # the state dict load_state_dict last applied
        self._pending_losses: list[tuple[int, int, int, torch.Tensor]] = []
        self._ready = False

    # ---------------------------------------------------------------------------------------
    # set-up
    # ---------------------------------------------------------------------------------------
    @staticmethod
    def _clone_metrics(metrics: Any, prefix: str):
        if metrics is None:
            return None
        from torchmetrics import MetricCollection

        if not isinstance(metrics, MetricCollection):
            metrics = MetricCollection(dict(metrics) if isinstance(metrics, Mapping) else metrics)
        clone = metrics.clone(prefix=prefix)
        clone.persistent(True)  # so a mid-epoch checkpoint carries the epoch's partial state
        return clone

    def _setup(self) -> None:
        if self._ready:
            return
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.raw_model.to(self.device, memory_format=memory_format)
        self.loss_fn.to(self.device)
        for m in (self.val_metrics, self.train_metrics):
            if m is not None:
                m.to(self.device)
        _move_optimizer_state(self.optimizer, self.device)
        if self.compile:
            from torchkiln.engine.compile import compile_model, dynamo_stats

            self._dynamo_before = dynamo_stats()
            self.model = compile_model(self.raw_model, self.compile_options, self.cache_size_limit)
        self.model = distributed.wrap_model(self.model, self.device, self.strategy, self.sync_batchnorm)
        self._undistributed = distributed.unwrap_ddp(self.model)  # what DDP wraps (compiled, synced BN)
        if not distributed.is_rank0():  # rank duties: only rank 0 logs and shows progress
            self.loggers, self.progress = [], Progress(enabled=False)
        self._ready = True

    def use_run_dir(self, run_dir: str | Path, loggers: Iterable[Logger] = ()) -> None:
        """Write checkpoints into `run_dir` and send the run's numbers to `loggers` too (a command
        builds and checks the Trainer first, then makes the directory and calls this)."""
        self.run_dir = Path(run_dir)
        self.loggers.extend(loggers)

    # ---------------------------------------------------------------------------------------
    # fit
    # ---------------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable, val_loader: Iterable | None = None,
            resume: str | Path | dict | None = None) -> dict[str, Any]:
        """Train for `epochs` (continuing from `resume`, a checkpoint path or its loaded dict)."""
        started = time.perf_counter()
        self._setup()
        if not self.monitor:
            watched = self.val_metrics if val_loader is not None else self.train_metrics
            names = list(watched.keys(keep_base=True)) if watched is not None else []
            self.monitor = self.task.default_monitor(names, val_loader is not None)
        self.schedule.monitor = self.monitor
        self.mode = self.mode or self.task.monitor_mode(self.monitor)
        self.check_monitor(val_loader is not None)
        if self.run_dir is not None and distributed.is_rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(self.ckpt_dir)

        resumed = resume is not None
        if resumed and resume is not self._loaded_state:  # run.train loads (and checks) it first
            self.load_state_dict(resume if isinstance(resume, dict) else load_checkpoint(resume, self.device))
        if resumed:
            log.info("resumed at epoch %d, step %d (batch %d of the epoch)", self.loop.epoch + 1,
                     self.loop.global_step, self.loop.batch_in_epoch)
        else:
            self.loop = LoopState()
            self.initial_fingerprint = fingerprint(self.raw_model)
        if self.freezer is not None:
            if self.freezer.set_epoch(self.loop.epoch):
                self._trainable_changed()
        self._log_start()
        info = {"fingerprint": self.initial_fingerprint, "epochs": self.epochs, "monitor": self.monitor,
                "mode": self.mode, "best": self.loop.best}
        for lg in self.loggers:
            lg.start(info, resume_epoch=self.loop.epoch + 1 if resumed else None,
                     resume_step=self.loop.global_step)

        steps_per_epoch = math.ceil(len(train_loader) / self.stepper.accumulate)  # type: ignore[arg-type]
        try:
            for epoch in range(self.loop.epoch, self.epochs):
                if self.loop.stopped_early:  # resumed from the checkpoint of an early stop
                    break
                record = self._train_epoch(epoch, train_loader, steps_per_epoch)
                if val_loader is not None:
                    record.update(self._validate_and_show(epoch + 1, val_loader))
                record = distributed.broadcast_object(record)  # every rank decides on rank 0's numbers
                self._end_epoch(epoch, record)
                stop = self._agreed_stop(force=True)
                if stop is not None:
                    self.checkpoints.wait()
                    raise StopRequested(stop, self._ckpt_str("last.ckpt"))
                if self.loop.stopped_early:
                    log.info("early stop: %s did not improve for %d epochs (best %.6g at epoch %s)",
                             self.monitor, self.early_stop, self.loop.best, self.loop.best_epoch)
                    break
        except BaseException:
            self._wait_for_checkpoints(quiet=True)  # the error in flight is the one to report
            raise
        finally:
            failure = None
            try:
                self._wait_for_checkpoints()
            except CheckpointError as exc:
                failure = exc
            self.checkpoints.close()  # its writer thread ends with the run (made again if needed)
            self.progress.close()
            self._flush_steps()
            if self._dynamo_before is not None:
                from torchkiln.engine.compile import report_compilation

                self.compile_report = report_compilation(self._dynamo_before)
            summary = self.summary(time.perf_counter() - started)
            for lg in self.loggers:
                lg.finish(summary)
        if failure is not None:
            raise failure
        return summary

    def _train_epoch(self, epoch: int, loader: Iterable, steps_per_epoch: int) -> dict[str, float]:
        model, loop, stepper, k = self.model, self.loop, self.stepper, self.stepper.accumulate
        model.train()
        if self.freezer is not None and self.freezer.set_epoch(epoch):
            self._trainable_changed()
            model = self.model
            model.train()
            trainable, frozen = self.freezer.counts()
            log.info("epoch %d: %s; %d parameters trainable, %d frozen", epoch + 1,
                     "froze" if self.freezer.frozen else "unfroze", trainable, frozen)
        n_batches = len(loader)  # type: ignore[arg-type]
        start = loop.batch_in_epoch
        set_loader_epoch(loader, epoch, skip=start)
        loss_sum, count = self._restore_epoch_accum()
        self._train_buffer = MetricBuffer(self.task, self.train_metrics)
        self.progress.epoch_start(epoch + 1, self.epochs, n_batches, done=start)
        self.device_stats.epoch_start()
        check_finite = stepper.scaler is None
        defer = self.defer_finite_check if self.defer_finite_check is not None else self.device.type != "cpu"
        defer = defer and check_finite and self.on_nonfinite == "stop"

        sizes = epoch_batch_sizes(loader, n_batches)
        group_used = False  # a group whose every micro-batch was skipped takes no optimizer step
        for i, batch in enumerate(loader, start=start):
            group_start = (i // k) * k
            group_size = min(k, n_batches - group_start)  # the epoch's last group may be shorter
            last_in_group = i - group_start == group_size - 1
            if sizes is not None:  # each micro-batch's share of the group's samples
                weight = sizes[i] / sum(sizes[group_start:group_start + group_size])
            else:
                weight = 1.0 / group_size
            batch = move_to(batch, self.device, self.channels_last)
            n = self.task.batch_size(batch)

            with stepper.micro_context(model, last_in_group):
                with stepper.autocast():
                    outputs, targets = self.task.forward(model, batch)
                    loss = self.task.loss(self.loss_fn, outputs, targets)
                if defer:
                    self._pending_losses.append((epoch, loop.global_step + 1, i, loss.detach()))
                if check_finite and not defer and not self._finite_everywhere(loss):
                    if self.on_nonfinite == "stop":
                        raise _nonfinite_error(loss.item(), epoch, loop.global_step + 1, i)
                    log.warning("skipped batch %d of epoch %d: non-finite loss %s (on this or another rank)",
                                i + 1, epoch + 1, loss.item())
                else:
                    stepper.backward(loss, weight)
                    group_used = True
                    loss_sum += loss.detach().float() * n
                    count += n
                    self._train_buffer.add(outputs, targets)
            loop.batch_in_epoch = i + 1
            self.progress.advance(1, n)

            if last_in_group and group_used:
                lrs = self.schedule.lrs()  # the learning rates this step uses
                result = stepper.step(want_norm=self._logs_steps())
                loop.global_step += 1
                if result.stepped:
                    self.schedule.on_optimizer_step(epoch, i // k, steps_per_epoch)
                else:
                    log.info("step %d skipped by the fp16 GradScaler (inf/NaN gradients; scale now %g);"
                             " the LR schedule did not advance (%d skipped so far)", loop.global_step,
                             stepper.scaler.get_scale(), stepper.skipped)
                self._record_step(loss.detach(), result.grad_norm, lrs)
                if loop.global_step % self.log_every_n_steps == 0:
                    self._check_pending_losses()
            elif last_in_group:
                stepper.optimizer.zero_grad(set_to_none=True)
            if last_in_group:
                group_used = False
                if i + 1 < n_batches:
                    self._maybe_checkpoint_mid_epoch(loss_sum, count)

        self._flush_steps()
        self._check_pending_losses()  # before anything of this epoch is validated, logged or saved
        if count == 0:
            raise TrainingError(f"epoch {epoch + 1} had no usable batch (empty loader or every loss non-finite)")
        loss_sum, count = distributed.sum_over_ranks(loss_sum, count)
        record = {"train/loss": float(loss_sum / count)}
        self._train_buffer.flush()
        if self.train_metrics is not None:
            record.update(_scalars(self.train_metrics.compute()))
            self.train_metrics.reset()
        self._epoch_accum = None
        return record

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether this micro-batch's loss is finite; with `skip_batch` under DDP, on every rank:
        a rank that skipped its backward alone would leave the others waiting in DDP's all-reduce,
        so the ranks agree (one all-reduce) and skip the batch together."""
        finite = math.isfinite(loss.item())
        if self.on_nonfinite == "skip_batch" and distributed.is_distributed():
            return distributed.all_ranks(finite, self.device)
        return finite

    def _maybe_checkpoint_mid_epoch(self, loss_sum: torch.Tensor, count: int) -> None:
        every = self.checkpoint_every_steps
        due = every is not None and self.loop.global_step % every == 0
        stop = self._agreed_stop()
        if not due and stop is None:
            return
        self._train_buffer.flush()
        accum = {
            "loss_sum": loss_sum.detach().cpu(),
            "count": count,
            "metrics": self.train_metrics.state_dict() if self.train_metrics is not None else None,
        }
        if self.run_dir is not None:
            self._flush_logs()
            state = self.state_dict(epoch_accum=accum)
            written = None
            if due:
                written = self._save(state, f"step-{self.loop.global_step:06d}.ckpt", numbered=True)
            self._save(state, "last.ckpt", copy_of=written)
        if stop is not None:
            self._flush_steps()
            self.checkpoints.wait()
            raise StopRequested(stop, self._ckpt_str("last.ckpt"))

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

    def _trainable_changed(self) -> None:
        """Frozen or unfrozen parameters: DDP all-reduces the gradients of exactly the parameters
        that required them when it was built, so it is built again over the new trainable set
        (the ranks hold equal weights; every rank does this at the same epoch)."""
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self.model = distributed.wrap_model(self._undistributed, self.device, self.strategy, False)

    def _restore_epoch_accum(self) -> tuple[torch.Tensor, int]:
        accum = getattr(self, "_epoch_accum", None)
        if self.train_metrics is not None:
            self.train_metrics.reset()
        if not accum or self.loop.batch_in_epoch == 0:
            return torch.zeros((), device=self.device), 0
        if self.train_metrics is not None and accum.get("metrics") is not None:
            self.train_metrics.load_state_dict(accum["metrics"])
        return accum["loss_sum"].to(self.device), int(accum["count"])

    def _end_epoch(self, epoch: int, record: dict[str, float]) -> None:
        loop = self.loop
        for i, lr in enumerate(self.schedule.lrs()):
            record[f"lr/group{i}"] = lr
        loop.epoch = epoch + 1
        loop.batch_in_epoch = 0
        self.schedule.on_epoch_end(record)
        improved = self._update_best(record)
        loop.history.append(dict(record))
        record.update(self.device_stats.epoch_end())
        seconds = self.progress.epoch_end(epoch + 1, self.epochs, record)
        record["time/epoch_s"] = seconds
        record["time/samples_per_s"] = self.progress.samples / max(seconds, 1e-9)
        for lg in self.loggers:
            lg.log_epoch(epoch + 1, loop.global_step, record)
        if self.run_dir is not None:
            self._flush_logs()
            state = self.state_dict()
            written = None  # serialize once: the epoch's other files copy the first one's bytes
            if improved:
                written = self._save(state, "best.ckpt")
            if self.save_period and (epoch + 1) % self.save_period == 0:
                written = self._save(state, f"epoch-{epoch + 1:03d}.ckpt", numbered=True, copy_of=written)
            self._save(state, "last.ckpt", copy_of=written)

    def _update_best(self, record: dict[str, float]) -> bool:
        loop, value = self.loop, record.get(self.monitor)
        if value is None:
            raise ConfigError(
                f"trainer.monitor: '{self.monitor}' is not logged; logged: {', '.join(sorted(record))}"
            )
        improved = is_finite(value) and (
            loop.best is None
            or (value < loop.best - self.min_delta if self.mode == "min" else value > loop.best + self.min_delta)
        )
        if improved:
            loop.best, loop.best_epoch, loop.bad_epochs = float(value), loop.epoch, 0
        else:
            loop.bad_epochs += 1
            if self.early_stop is not None and loop.bad_epochs >= self.early_stop:
                loop.stopped_early = True
        return improved

    def check_monitor(self, has_val: bool) -> None:
        """`monitor` names a number this run logs (with a validation loader when `has_val`)."""
        names = {"train/loss"}
        if has_val:
            names.add("val/loss")
            names.update(self.val_metrics.keys() if self.val_metrics is not None else [])
        if self.train_metrics is not None:
            names.update(self.train_metrics.keys())
        if self.monitor not in names:
            from torchkiln.errors import did_you_mean

            raise ConfigError(
                f"trainer.monitor: '{self.monitor}' will not be logged{did_you_mean(self.monitor, names)}"
                f" (logged: {', '.join(sorted(names))})"
            )

    # ---------------------------------------------------------------------------------------
    # evaluation
    # ---------------------------------------------------------------------------------------
    def _validate_and_show(self, epoch: int, loader: Iterable) -> dict[str, float]:
        """Validation; loggers that ask to see its outputs this epoch get them (and only then)."""
        wanting = [lg for lg in self.loggers if getattr(lg, "wants_validation", None) and lg.wants_validation(epoch)]
        # Under DDP only rank 0 has loggers, but every rank holds a shard of the validation set:
        # all ranks collect when rank 0 asks, and rank 0 gets the union.
        max_images = distributed.broadcast_object(
            max(getattr(lg, "max_images", 0) for lg in wanting) if wanting else None)
        collector = ValidationCollector(max_images, self.task.validation_views) if max_images is not None else None
        record = self._evaluate(loader, self.val_metrics, "val", collector)
        samples = collector.result() if collector is not None else []
        if collector is not None and distributed.is_distributed():
            samples = merge_samples(distributed.gather_objects(samples), max_images)
        for lg in wanting:
            for sample in samples:  # one per view: the classes, or each head and the combined class
                lg.log_validation(epoch, self.loop.global_step, sample)
        return record

    def _evaluate(self, loader: Iterable, metrics: Any, prefix: str,
                  collector: ValidationCollector | None = None) -> dict[str, float]:
        self._setup()  # outside inference_mode: parameters moved there would become inference tensors
        with torch.inference_mode():
            return self._evaluate_batches(loader, metrics, prefix, collector)

    def _evaluate_batches(self, loader: Iterable, metrics: Any, prefix: str,
                          collector: ValidationCollector | None) -> dict[str, float]:
        self.model.eval()
        if metrics is not None:
            metrics.reset()
        loss_sum, count = torch.zeros((), device=self.device), 0
        model = distributed.unwrap_ddp(self.model)  # ranks hold uneven shards: no collective here
        buffer = MetricBuffer(self.task, metrics)
        for batch in loader:
            batch = move_to(batch, self.device, self.channels_last)
            with self.stepper.autocast():
                outputs, targets = self.task.forward(model, batch)
                if targets is not None:
                    n = self.task.batch_size(batch)
                    loss_sum += self.task.loss(self.loss_fn, outputs, targets).float() * n
                    count += n
            if targets is not None:
                buffer.add(outputs, targets)
            if collector is not None:
                collector.update(self.task.split_batch(batch)[0], outputs, targets)
        buffer.flush()
        loss_sum, count = distributed.sum_over_ranks(loss_sum, count)
        record = {f"{prefix}/loss": float(loss_sum / count)} if count else {}
        if metrics is not None and count:
            computed = _scalars(metrics.compute())
            record.update({f"{prefix}/{k.split('/', 1)[1]}": v for k, v in computed.items()})
            metrics.reset()
        return record

    def evaluate(self, loader: Iterable, prefix: str = "val") -> dict[str, float]:
        """Loss and metrics over every sample of `loader`, keyed `<prefix>/<name>`."""
        return self._evaluate(loader, self.val_metrics, prefix)

    def validate(self, loader: Iterable) -> dict[str, float]:
        return self.evaluate(loader, "val")

    def test(self, loader: Iterable) -> dict[str, float]:
        return self.evaluate(loader, "test")

    def predict(self, loader: Iterable) -> torch.Tensor | dict[str, torch.Tensor]:
        """Model outputs for every batch, concatenated on the CPU; a model that returns a dict (one
        entry per head) gives a dict of the same keys, each concatenated over the batches."""
        self._setup()  # outside inference_mode (see _evaluate)
        self.model.eval()
        outs = []
        model = distributed.unwrap_ddp(self.model)
        with torch.inference_mode():
            for batch in loader:
                batch = move_to(batch, self.device, self.channels_last)
                with self.stepper.autocast():
                    outputs, _ = self.task.forward(model, batch)
                outs.append({k: v.float().cpu() for k, v in outputs.items()} if isinstance(outputs, dict)
                            else outputs.float().cpu())
        if not outs:
            return torch.empty(0)
        if isinstance(outs[0], dict):
            return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        return torch.cat(outs)

    # ---------------------------------------------------------------------------------------
    # per-step logging (scalars leave the device once per log interval)
    # ---------------------------------------------------------------------------------------
    def _logs_steps(self) -> bool:
        return bool(self.loggers) or self.progress.interactive

    def _record_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, lrs: list[float]) -> None:
        if not self._logs_steps():
            return
        row: dict[str, Any] = {"train/loss_step": loss.float()}
        if grad_norm is not None:
            row["train/grad_norm"] = grad_norm.float()
        for i, lr in enumerate(lrs):
            row[f"lr/group{i}"] = lr
        self._step_rows.append((self.loop.global_step, row))
        if self.loop.global_step % self.log_every_n_steps == 0:
            self._flush_steps()

    def _check_pending_losses(self) -> None:
        """The deferred non-finite-loss check: one device sync for every loss kept since the last."""
        if not self._pending_losses:
            return
        pending, self._pending_losses = self._pending_losses, []
        values = torch.stack([v.float() for *_, v in pending])
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return
        j = int((~finite).nonzero()[0])
        epoch, step, batch, _ = pending[j]
        raise _nonfinite_error(values[j].item(), epoch, step, batch)

    def _flush_steps(self) -> None:
        if not self._step_rows:
            return
        tensors = [v for _, row in self._step_rows for v in row.values() if isinstance(v, torch.Tensor)]
        values = iter(torch.stack(tensors).tolist()) if tensors else iter(())
        rows = [(s, {k: (next(values) if isinstance(v, torch.Tensor) else v) for k, v in row.items()})
                for s, row in self._step_rows]
        self._step_rows = []
        self.device_stats.sample()
        self.progress.show({"loss": rows[-1][1]["train/loss_step"]})
        if self.stepper.skipped:
            rows[-1][1]["train/skipped_steps"] = float(self.stepper.skipped)
        for lg in self.loggers:
            lg.log_steps(rows)

    def _flush_logs(self) -> None:
        """Before a checkpoint: everything logged up to it is on disk, so a resume neither loses
        nor repeats rows (loggers drop what was logged after the checkpoint it resumes from)."""
        self._flush_steps()
        for lg in self.loggers:
            lg.flush()

    def _log_start(self) -> None:
        total = sum(p.numel() for p in self.raw_model.parameters())
        trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        log.info("device %s, precision %s, %d parameters (%d trainable, %d frozen)", self.device,
                 self.stepper.precision, total, trainable, total - trainable)
        if self.freezer is not None:
            log.info("frozen: %s", self.freezer.describe())
        log.info("initial-parameter fingerprint %s", self.initial_fingerprint)

    # ---------------------------------------------------------------------------------------
    # checkpoints
    # ---------------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "checkpoints"

    def _ckpt_str(self, name: str) -> str | None:
        return str(self.ckpt_dir / name) if self.run_dir is not None else None

    def state_dict(self, epoch_accum: dict | None = None) -> dict[str, Any]:
        """Everything a resume needs, as plain data (loadable with weights_only=True).

        Under DDP this is a collective (each rank's RNG and partial epoch sums go to `ranks`):
        call it on every rank.
        """
        rng = rng_state()
        return {
            "format": FORMAT,
            "version": 1,
            "torchkiln": __version__,
            "torch": str(torch.__version__),
            "model": strip_prefixes(self.raw_model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "step": self.stepper.state_dict(),
            "loop": self.loop.to_dict(),
            "epoch_accum": epoch_accum,
            "rng": rng,
            "ranks": distributed.gather_rank_states({"rng": rng, "epoch_accum": epoch_accum}),
            "fingerprint": self.initial_fingerprint,
            "config": self.config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError("not a torchkiln checkpoint (use model.pretrained for plain weights)")
        self.load_weights(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"optimizer state does not fit this optimizer: {exc}") from exc
        _move_optimizer_state(self.optimizer, self.device)
        self.schedule.load_state_dict(state["schedule"])
        self.stepper.load_state_dict(state["step"])
        self.loop = LoopState.from_dict(state["loop"])
        own = distributed.own_rank_state(state, mid_epoch=self.loop.batch_in_epoch > 0) or state
        self._epoch_accum = own.get("epoch_accum")
        self.initial_fingerprint = state.get("fingerprint")
        set_rng_state(own["rng"])
        self._loaded_state = state

    def load_weights(self, weights: dict[str, torch.Tensor], strict: bool = True) -> None:
        weights = strip_prefixes(weights)
        own = self.raw_model.state_dict()
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        mismatched = [k for k in own if k in weights and own[k].shape != weights[k].shape]
        if strict and (missing or unexpected or mismatched):
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
            if unexpected:
                parts.append(f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}")
            if mismatched:
                k = mismatched[0]
                parts.append(f"shape of {k}: checkpoint {tuple(weights[k].shape)}, model {tuple(own[k].shape)}")
            raise CheckpointError(f"checkpoint does not fit this model ({'; '.join(parts)})")
        self.raw_model.load_state_dict(weights, strict=strict)

    def _save(self, state: dict[str, Any], name: str, numbered: bool = False,
              copy_of: Path | None = None) -> Path | None:
        """Hand `name` to the checkpoint writer (rank 0); `copy_of`, a file handed over just
        before from the same `state`, gets a second name instead of a second serialization."""
        self._check_pending_losses()  # weights after a non-finite loss are never saved
        if not distributed.is_rank0():  # rank duties: rank 0 writes, the others wait for it
            distributed.barrier()
            return None
        try:
            path = self.checkpoints.save(state, self.ckpt_dir / name, copy_of=copy_of)
        finally:
            distributed.barrier()
        if numbered and self.keep_last:
            self.checkpoints.run(_prune_numbered, self.ckpt_dir, self.keep_last)
        return path

    def _wait_for_checkpoints(self, quiet: bool = False) -> None:
        """Every checkpoint handed over is on disk; a failed write raises here (or, with `quiet`,
        while another error is already on its way out, is logged)."""
        try:
            self.checkpoints.wait()
        except CheckpointError as exc:
            if not quiet:
                raise
            log.error("%s", exc)

    # ---------------------------------------------------------------------------------------
    # stopping
    # ---------------------------------------------------------------------------------------
    def request_stop(self, signum: int) -> None:
        """Finish the current optimizer step, write a checkpoint, then raise StopRequested."""
        self._stop_signal = signum

    def summary(self, seconds: float | None = None) -> dict[str, Any]:
        loop = self.loop
        return {
            "epochs_completed": loop.epoch,
            "global_step": loop.global_step,
            "monitor": self.monitor,
            "mode": self.mode,
            "best": loop.best,
            "best_epoch": loop.best_epoch,
            "stopped_early": loop.stopped_early,
            "skipped_steps": self.stepper.skipped,
            "compile": self.compile_report,
            "final": loop.history[-1] if loop.history else {},
            "fingerprint": self.initial_fingerprint,
            "seconds": seconds,
        }


def _nonfinite_error(value: float, epoch: int, step: int, batch: int) -> TrainingError:
    return TrainingError(
        f"non-finite loss ({value}) at epoch {epoch + 1}, step {step} (batch {batch + 1}); the run stopped"
        f" and its saved checkpoints are intact (set trainer.on_nonfinite: skip_batch to skip such batches)"
    )


def _scalars(computed: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Scalars as they are; vectors (per-class metrics) as `name/<i>`; matrices are left to reports."""
    out: dict[str, float] = {}
    for k, v in computed.items():
        if not isinstance(v, torch.Tensor):
            continue
        if v.numel() == 1:
            out[k] = float(v)
        elif v.dim() == 1:
            out.update({f"{k}/{i}": x for i, x in enumerate(v.tolist())})
    return out


def _prune_numbered(directory: Path, keep: int) -> None:
    """Keep the newest `keep` numbered checkpoints (epoch-NNN.ckpt, step-NNNNNN.ckpt)."""
    numbered = sorted((p for p in directory.glob("*.ckpt") if re.match(r"(epoch|step)-\d+\.ckpt$", p.name)),
                      key=lambda p: p.stat().st_mtime_ns)
    for old in numbered[:-keep]:
        old.unlink(missing_ok=True)


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)
