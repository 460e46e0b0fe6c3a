"""The memory report, the leak watch and the CUDA memory snapshot.

- `MemoryReport`: after the first step, an estimate of parameters + gradients + optimizer state +
  one batch of activations (measured on that step, in the configured precision); on an out-of-memory
  stop, what was using the memory and the options with their numbers; and the leak watch:
  allocated memory after every `every_n_steps`-th optimizer step (the CUDA allocator on a GPU, the
  process's RSS elsewhere). A steady rise across one epoch's steps is a warning that names the
  usual causes. (Peak allocated/reserved per epoch on CUDA is `DeviceStatsMonitor`'s.)
- `MemorySnapshot`: `kiln train --memory-snapshot N` records the first N steps with torch's
  memory history and writes a snapshot for https://pytorch.org/memory_viz (CUDA only).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from torchkiln.engine.callbacks import Callback, StepInfo
from torchkiln.engine.memory import (
    MB,
    StepMemory,
    current_bytes,
    device_capacity,
    is_checkpointed,
    mb,
    oom_options,
)
from torchkiln.engine.oom import OutOfMemoryStop
from torchkiln.rundir import MEMORY_SNAPSHOT

log = logging.getLogger("torchkiln")
VIEWER = "https://pytorch.org/memory_viz"
LEAK_CAUSES = ("a tensor kept with its graph across steps (`total_loss += loss` in a task or callback: add"
               " `loss.item()` or `loss.detach()`), or a list that grows every step (outputs or losses kept"
               " for later: keep them on the CPU, detached, or only their sums)")


def steady_rise(samples: list[tuple[int, int]], min_rise: int, min_samples: int = 6,
                steady: float = 0.8) -> bool:
    """`samples` (step, bytes) rose by at least `min_rise`, in at least `steady` of its steps."""
    if len(samples) < min_samples:
        return False
    values = [b for _, b in samples]
    ups = sum(b > a for a, b in zip(values, values[1:]))
    return values[-1] - values[0] >= min_rise and ups >= steady * (len(values) - 1)


class MemoryReport(Callback):
    """`every_n_steps` None: no leak watch. `min_rise_mb`: the rise that counts (default: 1 MB of
    the CUDA allocator, 32 MB of RSS, which moves with the C allocator's own caching)."""

    def __init__(self, every_n_steps: int | None = 10, min_rise_mb: float | None = None):
        self.every_n_steps = int(every_n_steps) if every_n_steps else None
        self.min_rise_mb = min_rise_mb
        self.estimate: StepMemory | None = None
        self.samples: list[tuple[int, int]] = []
        self.warnings: list[str] = []
        self._first_step: int | None = None

    def on_fit_start(self, trainer: Any) -> None:
        self._first_step, self.estimate = trainer.loop.global_step + 1, None

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.samples = []

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        if self.estimate is None and trainer.stepper.oom.activations is not None:
            self._report_estimate(trainer)  # the first step measured (the first, unless it ran out of memory)
        if self.every_n_steps and info.step % self.every_n_steps == 0 and info.step > self._first_step:
            self.samples.append((info.step, current_bytes(trainer.device)))  # after step 1's optimizer state

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, float]) -> None:
        cuda = trainer.device.type == "cuda"
        default = 1 if cuda else 32
        min_rise = (self.min_rise_mb if self.min_rise_mb is not None else default) * MB
        if steady_rise(self.samples, int(min_rise)):
            (s0, b0), (s1, b1) = self.samples[0], self.samples[-1]
            what = "allocated on the GPU" if cuda else "resident (RSS)"
            text = (f"memory rose steadily across epoch {epoch + 1}: {mb(b0)} -> {mb(b1)} {what} from step {s0}"
                    f" to {s1} ({mb((b1 - b0) / max(1, s1 - s0))} per step). Likely causes: {LEAK_CAUSES}")
            self.warnings.append(text)
            log.warning("%s", text)

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        if isinstance(error, (OutOfMemoryStop, torch.OutOfMemoryError)):
            for line in self.oom_report(trainer):
                log.error("%s", line)

    def _report_estimate(self, trainer: Any) -> None:
        measured = trainer.stepper.oom.activations
        self.estimate = StepMemory.of(trainer.raw_model, trainer.optimizer, measured[0], measured[1],
                                      trainer.stepper.precision)
        line = self.estimate.line()
        capacity = device_capacity(trainer.device)
        if capacity:
            line += (f"; measured peak {mb(torch.cuda.max_memory_allocated(trainer.device))} of {mb(capacity)},"
                     f" a batch of about {self.estimate.batch_that_fits(capacity)} would fit")
        log.info("%s", line)

    def oom_report(self, trainer: Any) -> list[str]:
        """What was using the memory when a step failed, and what to try, with numbers."""
        event = trainer.stepper.oom.last_event
        if event is None:
            return []
        est = self.estimate
        lines = [f"out of memory at epoch {event.epoch + 1}, batch {event.batch + 1} ({event.samples} samples,"
                 f" {event.pieces} micro-batch(es)): {event.error}"]
        if est is not None:
            lines.append(f"  using it: parameters {mb(est.parameters)}, gradients {mb(est.gradients)}, optimizer"
                         f" state {mb(est.optimizer_state)}, activations about {mb(est.per_sample * event.samples)}"
                         f" for {event.samples} samples ({mb(est.per_sample)} each, {est.precision})")
        if event.allocated is not None:
            lines.append(f"  allocator: {mb(event.allocated)} allocated, {mb(event.reserved)} reserved")
        lines.append("  options:")
        lines += [f"  - {o}" for o in oom_options(
            event.samples, trainer.stepper.accumulate, trainer.stepper.precision, estimate=est,
            capacity=device_capacity(trainer.device), channels_last=trainer.placement.channels_last,
            checkpointed=is_checkpointed(trainer.raw_model), allocated=event.allocated, reserved=event.reserved)]
        return lines


class MemorySnapshot(Callback):
    """The first `steps` optimizer steps under torch's CUDA memory history, written as a snapshot."""

    rank_zero_only = True

    def __init__(self, steps: int, path: str | Path | None = None, max_entries: int = 100_000):
        self.steps, self.path, self.max_entries = int(steps), path, max_entries
        self.written: Path | None = None
        self._until: int | None = None

    def on_fit_start(self, trainer: Any) -> None:
        if trainer.device.type != "cuda":
            log.info("memory snapshot: CUDA only; not recorded on %s", trainer.device.type)
            return
        torch.cuda.memory._record_memory_history(max_entries=self.max_entries)
        self._until = trainer.loop.global_step + self.steps

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        if self._until is not None and info.step >= self._until:
            self._write(trainer)

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self._write(trainer)  # an out-of-memory stop is when the snapshot is wanted most

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        self._write(trainer)

    def _write(self, trainer: Any) -> None:
        if self._until is None:
            return
        self._until = None
        path = Path(self.path) if self.path is not None else _run_dir(trainer) / MEMORY_SNAPSHOT
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        self.written = path
        log.info("memory snapshot of the first %d step(s): %s (open it at %s)", self.steps, path, VIEWER)


def _run_dir(trainer: Any) -> Path:
    policy = trainer.checkpointing
    return policy.directory.parent if policy is not None and policy.directory is not None else Path.cwd()
