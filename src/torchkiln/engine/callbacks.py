"""The callback protocol: the moments of the loop a feature can act on, and its checkpointed state.

A callback subclasses `Callback` and overrides the moments it needs; every moment gets the
Trainer first. The Trainer calls them in the order given (its own parts' callbacks around the
user's: freezing first, the loggers and checkpointing last, so a checkpoint holds what every other
callback did at that moment). A callback with state returns it from `state_dict` (plain data and
tensors, loadable with weights_only=True); it is saved in every checkpoint and handed back to
`load_state_dict` on resume, so resuming with it stays exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from torchkiln.errors import KilnError, SettingError, refuse_class

if TYPE_CHECKING:
    from torchkiln.engine.trainer import Trainer
    from torchkiln.loggers.validation import ValidationSample


@dataclass
class StepInfo:
    """One optimizer step, as callbacks see it after it was taken (or skipped by the fp16 scaler)."""

    epoch: int  # 0-based
    step: int  # global optimizer steps taken so far, this one included
    batch: int  # 0-based index in the epoch of the step's last micro-batch
    loss: torch.Tensor  # the last micro-batch's loss (on the device: read it sparingly)
    grad_norm: torch.Tensor | None  # before clipping; None when nobody asked for it
    lrs: list[float]  # the learning rates this step used, per parameter group
    stepped: bool  # False when the fp16 GradScaler skipped it
    last_in_epoch: bool  # the epoch's last step: its end follows at once


class Callback:
    """Override the moments you need. `rank_zero_only` callbacks are not called on other ranks."""

    rank_zero_only: bool = False

    def check(self, trainer: Trainer, logged: set[str]) -> None:
        """Before anything runs (`logged`: the numbers this run will log): refuse what cannot work."""

    def on_fit_loaders(self, trainer: Trainer, train_loader: Iterable, val_loader: Iterable | None) -> None:
        """At the start of fit, before `on_fit_start`: the loaders this fit runs on, for a callback that
        passes over the data itself (SWA recomputes BatchNorm statistics on the training batches)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch (after a resume's state was loaded)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """`epoch` is 0-based; parameters may be frozen or unfrozen here."""

    def on_train_batch_end(self, trainer: Trainer, batch: int, samples: int) -> None:
        """After each micro-batch's backward (`batch`: 0-based index in the epoch)."""

    def on_step_end(self, trainer: Trainer, info: StepInfo) -> None:
        """After each optimizer step."""

    def validation_samples(self, trainer: Trainer, epoch: int) -> int | None:
        """How many misclassified inputs to collect in this epoch's validation (None: no samples)."""
        return None

    def on_validation_start(self, trainer: Trainer, epoch: int) -> None:
        """Before validation. A callback may put other weights in the model here (EMA, SWA: the
        weights validated and saved as the checkpoint's inference weights) and put the training
        weights back in `on_validation_end`."""

    def on_validation_end(self, trainer: Trainer, epoch: int, record: dict[str, float],
                          samples: list[ValidationSample]) -> None:
        """After validation; `samples` is empty unless some callback asked for them."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, float]) -> None:
        """`record` holds the epoch's numbers (a callback may add its own before the loggers see it)."""

    def on_save_checkpoint(self, trainer: Trainer, state: dict[str, Any]) -> None:
        """A checkpoint's state was assembled (everything logged so far should reach the disk now)."""

    def on_load_checkpoint(self, trainer: Trainer, state: dict[str, Any]) -> None:
        """A checkpoint's state was loaded into the Trainer."""

    def on_exception(self, trainer: Trainer, error: BaseException) -> bool | None:
        """The run ends with `error` (a stop request, Ctrl-C or a failure), before `on_fit_end`.
        Return True to end the run there: `fit` returns its summary instead of raising `error`."""

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """Always called once fit ends, whatever ended it."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def as_callbacks(callbacks: Callback | Iterable[Callback] | None) -> list[Callback]:
    """The user's `callbacks` as a list (one Callback alone is a list of one), each a Callback."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        return [callbacks]
    if isinstance(callbacks, (str, type)) or not isinstance(callbacks, Iterable):
        callbacks = [callbacks]  # one thing that is not a callback: refused below, by what it is
    found = list(callbacks)
    for cb in found:
        refuse_class("callbacks", cb, "a callback", "...")
        if not isinstance(cb, Callback):
            raise SettingError("callbacks", f"{type(cb).__name__} is not a torchkiln.Callback: give instances"
                               " of Callback subclasses (class Mine(torchkiln.Callback) overriding its moments)")
    return found


class CallbackList:
    """Calls each moment on every callback in order; rank-zero-only ones only on rank 0."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = as_callbacks(callbacks)

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def active(self, rank0: bool) -> None:
        """Keep only the callbacks this rank runs."""
        self.callbacks = [cb for cb in self.callbacks if rank0 or not cb.rank_zero_only]

    def call(self, moment: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, moment)(*args)

    def handled(self, trainer: Trainer, error: BaseException) -> bool:
        """`on_exception` on every callback; whether one of them ended the run there."""
        answers = [cb.on_exception(trainer, error) for cb in self.callbacks]
        return any(answers)

    def finish(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """`on_fit_end` on every callback even if one fails; the first user-facing error is raised."""
        first: KilnError | None = None
        for cb in self.callbacks:
            try:
                cb.on_fit_end(trainer, summary)
            except KilnError as exc:
                first = first or exc
        if first is not None:
            raise first

    def sample_count(self, trainer: Trainer, epoch: int) -> int | None:
        wanted = [n for cb in self.callbacks if (n := cb.validation_samples(trainer, epoch)) is not None]
        return max(wanted) if wanted else None

    def keys(self) -> list[str]:
        """A stable name per callback for its state in a checkpoint: class name, numbered if repeated."""
        seen: dict[str, int] = {}
        names = []
        for cb in self.callbacks:
            name = type(cb).__qualname__
            seen[name] = seen.get(name, 0) + 1
            names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return names

    def state_dict(self) -> dict[str, Any]:
        """Each callback's state, checked to be what a checkpoint can hold: one that is not (a numpy
        array, an object) would be written, then refused by every resume (weights_only loading)."""
        from torchkiln.engine.checkpoint import not_plain

        states = {}
        for k, cb in zip(self.keys(), self.callbacks):
            state = cb.state_dict()
            problem = not_plain(state)
            if problem is not None:
                raise SettingError(
                    "callbacks", f"{type(cb).__name__}.state_dict() holds {problem}; a checkpoint holds tensors"
                    " and plain data only (dicts, lists, numbers, strings), which a resume loads safely:"
                    " convert it (torch.as_tensor(...), .tolist())")
            states[k] = state
        return states

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for k, cb in zip(self.keys(), self.callbacks):
            if k in states:
                cb.load_state_dict(states[k])
