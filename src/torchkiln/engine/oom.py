"""One micro-batch's forward and backward, and what happens when it runs out of memory
(`trainer.on_oom`).

- `stop` (the default): the failed step's tensors are freed, last.ckpt is written from the state
  before that step (the optimizer step that began it never ran), and the run ends with one line
  that says what to try.
- `split`: the same samples are retried as 2, then 4, ... micro-batches, each backpropagated with
  its share of the batch, so the step's gradient (and the effective batch) stays the same up to
  floating-point error. BatchNorm's batch statistics are the exception: they come from the smaller
  pieces. Losses that are not a mean over samples (ranking losses over a whole query) change too.
  Each recovery is logged and counted; past `max_pieces` the run stops as under `stop`.

`torch.OutOfMemoryError` is caught by its type, and memory is freed outside the `except` block
(the traceback holds the failed step's tensors until the block ends).

Under DDP with `split` no rank may wait in a collective that another rank, retrying, never
reaches: forward and backward run on the module inside DDP (no gradient hooks fire), and at each
group's end the ranks all-reduce one flag (and the recovery count), then the gradients as one flat
all-reduce and the buffers from rank 0. Every rank recovers, or every rank stops. With `stop`
under DDP the failing rank ends the run (the launcher then stops the others; the last checkpoint
on disk is the last good state, since writing one is a collective).

A group's sums for the epoch's totals are added when the group ends, so a stop mid-group writes
a checkpoint whose totals and position are both those of the group's start.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchkiln.engine import distributed
from torchkiln.engine.memory import SavedActivations, free_memory
from torchkiln.errors import SettingError, TrainingError

if TYPE_CHECKING:
    from torchkiln.engine.totals import EpochTotals
    from torchkiln.engine.trainer import Trainer

log = logging.getLogger("torchkiln")
POLICIES = ("stop", "split")


class OutOfMemoryStop(TrainingError):
    """A step ran out of memory and was not recovered; last.ckpt holds the state before it."""


@dataclass
class OOMEvent:
    """What the memory report says about a failed step."""

    epoch: int
    batch: int  # 0-based index in the epoch
    samples: int
    pieces: int  # micro-batches of the last try
    error: str  # the first line of torch's message
    allocated: int | None = None
    reserved: int | None = None


def slice_batch(batch: Any, start: int, stop: int, n: int) -> Any:
    """Samples start..stop of a batch of `n`: tensors and lists of length `n` are cut, the rest kept."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, dict):
        return {k: slice_batch(v, start, stop, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        if len(batch) == n and n > 1 and not any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n
                                                 for v in batch):
            return type(batch)(batch[start:stop]) if isinstance(batch, list) else tuple(batch[start:stop])
        parts = [slice_batch(v, start, stop, n) for v in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    return batch


def piece_bounds(n: int, pieces: int) -> list[tuple[int, int]]:
    size = math.ceil(n / pieces)
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def forward_backward(trainer: Trainer, model: nn.Module, batch: Any, weight: float, pieces: int = 1,
                     last: bool = True, check: tuple[int, int, int] | None = None) -> tuple[Any, list]:
    """Forward, loss and backward of `batch` as `pieces` micro-batches, each weighted by its share of
    `weight`. Returns (the batch's loss, the sums for the epoch's totals: (loss, n, outputs, targets)
    per piece). `check`: (epoch, step, batch) for the non-finite-loss check; None skips it."""
    stepper, task = trainer.stepper, trainer.task
    n = task.batch_size(batch)
    bounds = piece_bounds(n, pieces) if pieces > 1 else [(0, n)]
    adds, total = [], None
    for j, (a, b) in enumerate(bounds):
        part = batch if len(bounds) == 1 else slice_batch(batch, a, b, n)
        with stepper.micro_context(model, last and j == len(bounds) - 1):
            with stepper.autocast():
                outputs, targets = task.forward(model, part)
                loss = task.loss(trainer.loss_fn, outputs, targets)
            if check is None or trainer.finite.usable(loss, *check):
                stepper.backward(loss, weight if len(bounds) == 1 else weight * (b - a) / n)
                adds.append((loss.detach(), b - a, _detached(outputs), targets))
        if len(bounds) > 1:  # the pieces' losses, weighted by their samples (no extra op on the usual path)
            share = loss.detach() * ((b - a) / n)
            total = share if total is None else total + share
    return (loss if len(bounds) == 1 else total), adds


def _detached(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, dict):
        return {k: _detached(v) for k, v in outputs.items()}
    return outputs


class OOMRecovery:
    """The training loop's per-batch forward and backward (`run`) and the group's end (`end_group`)."""

    def __init__(self, policy: str = "stop", max_pieces: int = 64, measure: bool = True):
        if policy not in POLICIES:
            raise SettingError("on_oom", f"expected stop or split; found {policy!r}")
        self.policy = policy
        self.max_pieces = max(2, int(max_pieces))
        self.measure = measure  # count the first batch's saved activations (the memory report's estimate)
        self.recoveries = 0  # steps recovered by splitting, over every rank
        self.activations: tuple[int, int] | None = None  # (bytes, samples) of the first batch measured
        self.last_event: OOMEvent | None = None
        self._local = 0  # this rank's recoveries since the ranks last agreed
        self._gave_up: str | None = None  # DDP: this rank could not recover; every rank stops at the group's end
        self._pending: list[tuple] = []  # the group's sums for the epoch's totals, added when it ends
        self._held: list[tuple[Any, float]] = []  # split: the group's earlier micro-batches (redone if needed)
        self._totals: EpochTotals | None = None

    @property
    def guarded(self) -> bool:
        """Under DDP `split` runs forward and backward outside DDP's hooks and syncs at the group's end."""
        return self.policy == "split" and distributed.is_distributed()

    # -- the loop's two calls ---------------------------------------------------------------
    def run(self, trainer: Trainer, model: nn.Module, batch: Any, i: int, weight: float, last: bool,
            totals: EpochTotals) -> tuple[torch.Tensor | None, bool]:
        """Forward and backward of micro-batch `i`; (its loss, whether it was backpropagated)."""
        self._totals = totals
        if self._gave_up is not None:  # DDP: wait for the group's end, where every rank learns it
            return None, False
        if self.guarded:
            if trainer.finite.policy == "skip_batch":
                raise SettingError("on_oom", "split under DDP cannot be combined with on_nonfinite: skip_batch"
                                   " (each needs the ranks to agree on every batch); use on_nonfinite: stop")
            model = distributed.unwrap_ddp(model)
        check = (trainer.loop.epoch, trainer.loop.global_step + 1, i)
        failed = None
        try:
            loss, adds = self._first_try(trainer, model, batch, weight, last, check)
        except torch.OutOfMemoryError as exc:
            failed = _first_line(exc)
        if failed is None:
            return self._done(batch, weight, loss, adds)
        # outside the except block: the traceback, and the failed step's tensors with it, are gone
        return self._recover(trainer, model, batch, i, weight, last, check, failed)

    def end_group(self, trainer: Trainer, used: bool) -> None:
        """At a group's end, before its optimizer step: the ranks agree (DDP + split), the group's
        sums join the epoch's totals, and a rank that could not recover stops them all."""
        recovered, gave_up = self._local, self._gave_up is not None
        if self.guarded:
            gave_up_n, recovered = distributed.sum_values([float(gave_up), float(recovered)], trainer.device)
            gave_up = gave_up_n > 0
            if not gave_up and used:
                distributed.average_gradients(trainer.optimizer)
                distributed.broadcast_buffers(trainer.placement.eval_model)
        self.recoveries += int(recovered)
        self._local = 0
        if gave_up:
            self._stop(trainer, trainer.loop.batch_in_epoch - 1, self._gave_up or "another rank ran out of memory")
        for add in self._pending:
            self._totals.add(*add)
        self._pending, self._held = [], []

    # -- inside ---------------------------------------------------------------------------------
    def _first_try(self, trainer, model, batch, weight, last, check):
        if self.measure and self.activations is None and not trainer.placement.compile:
            with SavedActivations(model) as saved:
                out = forward_backward(trainer, model, batch, weight, 1, last, check)
            self.activations = (saved.bytes, trainer.task.batch_size(batch))
            return out
        return forward_backward(trainer, model, batch, weight, 1, last, check)

    def _done(self, batch, weight, loss, adds) -> tuple[torch.Tensor, bool]:
        self._pending.extend(adds)
        if self.policy == "split" and adds:
            self._held.append((batch, weight))
        return loss, bool(adds)

    def _recover(self, trainer, model, batch, i, weight, last, check, error):
        n = trainer.task.batch_size(batch)
        self.last_event = _event(trainer, i, n, 1, error)
        free_memory()
        if self.policy == "stop":
            self._stop(trainer, i, self._message(trainer, error, i, n, 1))
        pieces = 2
        while pieces <= min(self.max_pieces, n):
            failed = None
            try:  # the gradients may hold part of the failed backward: the group's gradient starts again
                self._redo_group(trainer, model, pieces)
                loss, adds = forward_backward(trainer, model, batch, weight, pieces, last, check)
            except torch.OutOfMemoryError as exc:
                failed = _first_line(exc)
            if failed is None:
                self._local += 1
                log.warning("out of memory at epoch %d, batch %d (%d samples): recovered as %d micro-batches of"
                            " up to %d (recoveries so far: %d)", check[0] + 1, i + 1, n, pieces,
                            math.ceil(n / pieces), self.recoveries + self._local)
                return self._done(batch, weight, loss, adds)
            free_memory()
            pieces *= 2
        pieces = min(pieces // 2, n)
        self.last_event = _event(trainer, i, n, pieces, failed)
        message = self._message(trainer, failed, i, n, pieces)
        if self.guarded:
            self._gave_up = message
            trainer.optimizer.zero_grad(set_to_none=True)
            return None, False
        self._stop(trainer, i, message)

    def _redo_group(self, trainer, model, pieces) -> None:
        """The group's gradient from zero: its earlier micro-batches again, as `pieces` each."""
        trainer.optimizer.zero_grad(set_to_none=True)
        for held, w in self._held:  # already counted in the totals, and already checked
            forward_backward(trainer, model, held, w, pieces, last=False, check=None)

    def _message(self, trainer, error: str, i: int, n: int, pieces: int) -> str:
        from torchkiln.engine.memory import device_capacity, is_checkpointed, oom_options

        tried = f" and as {pieces} micro-batches" if pieces > 1 else ""
        options = oom_options(n, trainer.stepper.accumulate, trainer.stepper.precision,
                              capacity=device_capacity(trainer.device), channels_last=trainer.placement.channels_last,
                              checkpointed=is_checkpointed(trainer.raw_model))
        options = [o.split(" (")[0] for o in options if self.policy != "split" or "on_oom" not in o]
        return (f"out of memory at epoch {trainer.loop.epoch + 1}, batch {i + 1} ({n} samples{tried}): {error}."
                f" Try: {'; '.join(options)}; `kiln find-batch-size` finds the largest batch that fits")

    def _stop(self, trainer: Trainer, i: int, message: str) -> None:
        """last.ckpt from the state before this step (the group's start), then the one-line error."""
        self._pending, self._held = [], []
        trainer.optimizer.zero_grad(set_to_none=True)
        free_memory()
        saved = None
        policy = trainer.checkpointing
        if policy is not None and policy.directory is not None and (self.guarded or not distributed.is_distributed()):
            loop = trainer.loop
            position = loop.batch_in_epoch
            loop.batch_in_epoch = (i // trainer.stepper.accumulate) * trainer.stepper.accumulate
            try:
                saved = policy.save_last(trainer.state_dict())
            finally:
                loop.batch_in_epoch = position
        where = f"; {saved} holds the state before this step" if saved is not None else ""
        raise OutOfMemoryStop(message + where)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200].rstrip(".")


def _event(trainer, i: int, n: int, pieces: int, error: str) -> OOMEvent:
    cuda = trainer.device.type == "cuda"
    return OOMEvent(trainer.loop.epoch, i, n, pieces, error,
                    torch.cuda.memory_allocated(trainer.device) if cuda else None,
                    torch.cuda.memory_reserved(trainer.device) if cuda else None)
