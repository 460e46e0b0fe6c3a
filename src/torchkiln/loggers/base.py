"""The logger protocol: three moments, plain floats only."""

from __future__ import annotations

from typing import Any


class Logger:
    """Receives per-step scalars (buffered by the trainer), per-epoch records, and the summary."""

    def start(self, info: dict[str, Any], resume_epoch: int | None = None, resume_step: int = 0) -> None:
        """`resume_epoch` is the first epoch that will be (re)written when resuming."""

    def log_steps(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """rows of (global_step, {name: value})."""

    def log_epoch(self, epoch: int, step: int, record: dict[str, float]) -> None:
        """`epoch` is 1-based; `record` holds train/..., val/..., lr..."""

    def flush(self) -> None:
        """Put everything logged so far on disk; called before each checkpoint is written."""

    def finish(self, summary: dict[str, Any]) -> None:
        """Called once at the end of fit (also after an early stop or a stop request)."""
