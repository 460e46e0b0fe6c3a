"""`data.on_error: skip`, found lazily: a file that fails to decode while an epoch is read is
replaced by the next sample of its split that decodes, and listed.

Nothing is decoded up front (a broken file costs what decoding it costs, once it is read). The
replacement is a pure function of the split's index and the files, so the batches are the same
after a resume, in every worker and on every rank. The broken files go to the run's
`skipped_files.txt` as they are found (from any worker process) and count against
`data.max_skipped`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from torchkiln.errors import DataError


class BrokenInput(DataError):
    """A sample's file that cannot be read; `path` and `reason` say which and why."""

    def __init__(self, message: str, path: str, reason: str):
        super().__init__(message)
        self.path, self.reason = path, reason


class SkipLog:
    """The broken inputs of one data set (`source`, with the files `paths`) under on_error: skip:
    those `found` when it was built, then those found while reading it. Once `attach` names the
    run's list, every process appends what it finds there, and the count over all processes is
    what `max_skipped` (a fraction of the files) bounds."""

    def __init__(self, source: str, paths: list[str], max_skipped: float, found: list[tuple[str, str]]):
        self.source, self.max_skipped = source, max_skipped
        self.found = list(found)
        self.paths = set(paths) | {p for p, _ in found}
        self.total = len(self.paths)
        self.path: Path | None = None

    def attach(self, path: Path) -> None:
        self.path = Path(path)

    def record(self, path: str, reason: str) -> None:
        listed = self._listed()
        if path not in listed:
            self.found.append((path, reason))
            listed.add(path)
            if self.path is not None:
                line = f"{path}\t{reason}\n".encode()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)  # one write in append mode: lines of processes do not mix
                finally:
                    os.close(fd)
        broken = len(listed & self.paths)  # the run's list holds every data set's
        if broken > self.max_skipped * self.total:
            raise DataError(f"{self.source}: {broken} of {self.total} inputs are broken"
                            f" ({broken / self.total:.1%}, above data.max_skipped={self.max_skipped:g});"
                            f" latest: {reason}")

    def _listed(self) -> set[str]:
        listed = {p for p, _ in self.found}
        if self.path is not None and self.path.is_file():
            listed |= {ln.split("\t", 1)[0] for ln in self.path.read_text(encoding="utf-8").splitlines()}
        return listed


class SkipBroken(Dataset):
    """A split whose sample `i`, when its file is broken, is the next sample (i+1, i+2, ...,
    wrapping around) that reads; the broken files go to `log`."""

    def __init__(self, dataset: Dataset, log: SkipLog):
        self.dataset, self.log = dataset, log

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        for k in range(n):
            try:
                return self.dataset[(index + k) % n]
            except BrokenInput as exc:
                self.log.record(exc.path, exc.reason)
        raise DataError(f"{self.log.source}: no usable inputs in this split (all {n} are broken)")


class Skipped(list):
    """The broken inputs of a run's data sets (a list of (file, reason)); `attach` sends those
    found from then on to the run's list too."""

    def __init__(self, logs: list[SkipLog]):
        super().__init__(entry for log in logs for entry in log.found)
        self.logs = logs

    def attach(self, path: Path) -> None:
        for log in self.logs:
            log.attach(path)


def skip_broken(split: Dataset | None, log: SkipLog | None) -> Dataset | None:
    """`split` read under on_error: skip when its data set has a `log`, else as it is."""
    return split if split is None or log is None else SkipBroken(split, log)
