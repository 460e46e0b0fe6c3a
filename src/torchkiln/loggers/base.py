"""The logger protocol: a few moments, plain floats only (plus an opt-in look at validation outputs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torchkiln.loggers.validation import ValidationSample


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

    def log_epoch(self, epoch: int, step: int, record: dict[str, float]) -> None:
        """`epoch` is 1-based; `record` holds train/..., val/..., lr..."""

    def flush(self) -> None:
        """Put everything logged so far on disk; called before each checkpoint is written."""

    def finish(self, summary: dict[str, Any]) -> None:
        """Called once at the end of fit (also after an early stop or a stop request)."""
