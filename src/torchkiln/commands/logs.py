"""Where the commands' log records go: the console, the records held while a run is built, train.log."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from torchkiln.rundir import TRAIN_LOG

log = logging.getLogger("torchkiln")


class _Console(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (not the one at creation)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def console(quiet: bool) -> None:
    """The torchkiln logger on stderr: INFO and up, or warnings and errors only when `quiet`."""
    handler = next((h for h in log.handlers if isinstance(h, _Console)), None)
    if handler is None:
        handler = _Console()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


class _Held(logging.Handler):
    """Keeps the records logged while a run is built (before its directory exists) for train.log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_log(rank0: bool = True) -> Iterator[list[logging.LogRecord]]:
    """Collect the records of the build for train.log (rank 0's: other ranks keep their quieter level)."""
    from torchkiln.loggers.summary import at_least_info

    held = _Held()
    log.addHandler(held)
    level = at_least_info() if rank0 else log.level
    try:
        yield held.records
    finally:
        log.setLevel(level)
        log.removeHandler(held)


@contextlib.contextmanager
def file_log(run_dir: Path, earlier: list[logging.LogRecord] = ()) -> Iterator[None]:
    """train.log in `run_dir` for the run's records (`earlier`: those logged before it existed)."""
    from torchkiln.loggers.summary import at_least_info, train_log_handler

    handler = train_log_handler(run_dir / TRAIN_LOG)
    for record in earlier:
        handler.handle(record)
    log.addHandler(handler)
    level = at_least_info()
    try:
        yield
    except (Exception, KeyboardInterrupt) as exc:
        from torchkiln.engine.state import StopRequested

        if not isinstance(exc, StopRequested):  # (a stop by a signal has its own line)
            # the line the console shows (the CLI prints it once this returns), kept in train.log too
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (ending(exc),), None))
        raise
    finally:
        log.setLevel(level)
        log.removeHandler(handler)
        handler.close()


def ending(exc: BaseException) -> str:
    """One line for what ended a run: a user error's message, else the exception's type and first line."""
    from torchkiln.errors import KilnError, described, first_line

    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return first_line(exc) if isinstance(exc, KilnError) else described(exc)
