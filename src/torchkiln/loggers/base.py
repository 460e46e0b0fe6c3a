"""The logger protocol: a few moments, plain floats only (plus an opt-in look at validation outputs)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torchkiln.loggers.validation import BoxSample, ValidationSample


class Logger:
    """Receives per-step scalars (buffered by the trainer), per-epoch records, and the summary.

    A logger that draws from model outputs (misclassified images, a confusion matrix) answers
    `wants_validation(epoch)` with True; only then does the trainer gather a `ValidationSample`
    during that epoch's validation and hand it to `log_validation` before `log_epoch`.
    """

    #: misclassified validation inputs this logger wants in its sample (0: predictions only)
    max_images: int = 0

    def start(self, info: dict[str, Any], resume_epoch: int | None = None, resume_step: int = 0) -> None:
        """`resume_epoch` is the first epoch that will be (re)written when resuming."""

    def log_steps(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """rows of (global_step, {name: value})."""

    def wants_validation(self, epoch: int) -> bool:
        """Whether this logger wants `log_validation` for `epoch` (1-based)."""
        return False

    def log_validation(self, epoch: int, step: int, sample: ValidationSample) -> None:
        """Predictions and targets over the validation set (and a few misclassified inputs)."""

    def log_boxes(self, epoch: int, step: int, sample: BoxSample) -> None:
        """A few validation images with their predicted and true boxes (a detection task)."""

    def log_epoch(self, epoch: int, step: int, record: dict[str, float]) -> None:
        """`epoch` is 1-based; `record` holds train/..., val/..., lr..."""

    def flush(self) -> None:
        """Put everything logged so far on disk; called before each checkpoint is written."""

    def finish(self, summary: dict[str, Any]) -> None:
        """Called once at the end of fit (also after an early stop or a stop request)."""


class PictureCadence:
    """Which epochs get validation pictures (they cost a few ms to draw and encode, which on a
    0.1 s epoch is several percent): every `every` epochs, or with `every=None` ("auto") as often
    as keeps their cost within `budget` of the time since the run (or resume) started. The first
    and the last epoch always get them.

    Auto also draws the second epoch: the first drawing carries one-time costs (the font, the PNG
    encoder: ~40 ms against ~15 ms a drawing on digits), and the second measures what a drawing
    costs. The budget counts the first at the latest drawing's cost (or its own, if that is less),
    so that the one-time part (paid once, like an import) does not hold the pictures off for the
    run's first tens of epochs."""

    def __init__(self, every: int | None = None, budget: float = 0.01):
        self.every = every
        self.budget = budget
        self.start(None)

    def start(self, last_epoch: int | None) -> None:
        """A run (or resume) begins; `last_epoch` is its final epoch, when known."""
        self.last_epoch = last_epoch
        self.started = time.perf_counter()
        self.spent = 0.0
        self.cost = 0.0  # the latest epoch's drawing seconds: the next one is expected to cost as much
        self.first = 0.0  # the first drawn epoch's seconds (with the one-time costs)
        self.epochs_drawn = 0
        self.epoch: int | None = None  # the epoch of the latest drawing

    def due(self, epoch: int) -> bool:
        if self.epochs_drawn == 0 or (self.last_epoch is not None and epoch >= self.last_epoch):
            return True
        if self.every is not None:
            return epoch % self.every == 0
        if self.epochs_drawn == 1:
            return True
        spent = self.spent - self.first + min(self.first, self.cost)
        return spent + self.cost <= self.budget * (time.perf_counter() - self.started)

    @contextmanager
    def timed(self, epoch: int | None = None) -> Iterator[None]:
        """Time one drawing; the drawings of one `epoch` (a multihead task's views) add up."""
        start = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - start
            same = epoch is not None and epoch == self.epoch and self.epochs_drawn > 0
            self.cost = self.cost + took if same else took
            self.epochs_drawn += 0 if same else 1
            if self.epochs_drawn == 1:
                self.first = self.cost
            self.epoch = epoch
            self.spent += took
