"""User-facing errors: one class per area, caught once in the CLI and printed as one line."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Set by `kiln train --devices N` for its workers: a folder where each writes its user error, which
# the launcher prints once however many ranks hit it (engine/distributed.py:launch).
WORKER_ERRORS_ENV = "KILN_WORKER_ERRORS"


class KilnError(Exception):
    """An error the user can fix; the message says what, where and how."""

    exit_code = 2


class ConfigError(KilnError):
    pass


class SettingError(ConfigError):
    """An engine part refused one of its settings; it names the part's parameter, and the command
    that built the part from a config turns that into the config's key path."""

    def __init__(self, setting: str, detail: str):
        super().__init__(f"{setting}: {detail}")
        self.setting = setting
        self.detail = detail


def at_least(setting: str, value: object, least: int) -> int:
    """`value` as a whole number, refused (naming `setting`) when it is not one or is below `least`."""
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        number = None
    if number is None or number < least or isinstance(value, float) and number != value:
        raise SettingError(setting, f"expected a whole number of at least {least}; found {value!r}")
    return number


class DataError(KilnError):
    pass


class CheckpointError(KilnError):
    pass


class TrainingError(KilnError):
    """The run cannot continue (e.g. a non-finite loss); saved checkpoints are intact."""


@contextmanager
def flag_errors(flags: dict[str, str]) -> Iterator[None]:
    """An engine part's SettingError about a value a command-line flag gave, named by the flag
    (`flags`: the part's setting -> the flag) instead of a config key."""
    try:
        yield
    except SettingError as exc:
        if exc.setting not in flags:
            raise
        raise ConfigError(f"{flags[exc.setting]}: {exc.detail}") from exc


def refuse_class(setting: str, value: object, what: str, arguments: str) -> None:
    """A part given as its class (`torch.optim.SGD`) where the built object is wanted."""
    if isinstance(value, type):
        name = value.__name__
        raise SettingError(setting, f"got the class {name}, not {what}: pass {name}({arguments})")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, so that a report of it stays one line ('' for none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def described(exc: BaseException) -> str:
    """'Type: first line' of an exception (its type alone when it has no message)."""
    line = first_line(exc)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' did you mean 'x'?' suffix for the closest choice, or ''."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        close = [lowered[word.lower()]]
    else:
        close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def message(exc: KilnError) -> str:
    """The error's own line. One raised in a DataLoader worker (a collate's, a dataset's) comes back
    from torch as the same class holding "Caught X in DataLoader worker process N." and the worker's
    traceback, whose last line is the original's `module.Class: message`."""
    text = str(exc)
    if "\n" not in text or not text.startswith(f"Caught {type(exc).__name__} "):
        return text
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def report(exc: KilnError) -> None:
    """The one line of a user's error, on stderr; a `--devices N` worker hands it to its launcher."""
    line = f"error: {message(exc)}"
    folder = os.environ.get(WORKER_ERRORS_ENV)
    if folder and Path(folder).is_dir():
        (Path(folder) / f"rank{int(os.environ.get('RANK', '0')):05d}.txt").write_text(line)
        return
    print(line, file=sys.stderr)


def worker_errors(folder: str | Path, nprocs: int) -> list[str]:
    """The workers' error lines, each distinct line once, in rank order; a line that not every one
    of the `nprocs` ranks wrote names its ranks."""
    found: dict[str, list[int]] = {}
    for f in sorted(Path(folder).glob("rank*.txt")):
        found.setdefault(f.read_text().strip(), []).append(int(f.stem[4:]))
    if len(found) == 1 and len(next(iter(found.values()))) == nprocs:
        return list(found)
    return [line.replace("error: ", f"error: rank {', '.join(map(str, ranks))}: ", 1) for line, ranks in found.items()]
