"""User-facing errors: one class per area, caught once in the CLI and printed as one line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


class DataError(KilnError):
    pass


class CheckpointError(KilnError):
    pass


class TrainingError(KilnError):
    """The run cannot continue (e.g. a non-finite loss); saved checkpoints are intact."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' did you mean 'x'?' suffix for the closest choice, or ''."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        close = [lowered[word.lower()]]
    else:
        close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
