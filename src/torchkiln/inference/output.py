"""The prediction file: rows in input order (one or more per input, as the task's writer says),
written to a temp file and renamed when whole; unreadable inputs stop the run with one line, or
(`on_error: skip`) get the writer's empty rows and are listed in `<out stem>_skipped.txt`."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from torchkiln.errors import CheckpointError, DataError


def skipped_list(out: Path) -> Path:
    return out.with_name(f"{out.stem}_skipped.txt")


class OrderedCsv:
    """Rows arrive per input position, in batches; they are written in input order."""

    def __init__(self, out: Path, writer: Any, ids: list[str], on_error: str):
        if on_error not in ("raise", "skip"):
            raise DataError(f"--on-error: expected raise or skip; found {on_error!r}")
        self.out, self.writer, self.ids, self.on_error = Path(out), writer, ids, on_error
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f".tmp-{self.out.name}.{os.getpid()}")
        self.file = open(self.tmp, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.csv = csv.writer(self.file)
        self.pending: dict[int, list[list[Any]]] = {}
        self.next = 0
        self.rows = 0
        self.skipped: list[tuple[str, str]] = []  # (id, reason)
        self.header_written = False

    def failed(self, failures: list[tuple[int, str]]) -> None:
        for index, reason in failures:
            if self.on_error == "raise":
                raise DataError(f"{reason}; fix or remove the file, or use --on-error skip")
            self.skipped.append((self.ids[index], reason))
            self.pending[index] = self.writer.empty_rows(self.ids[index])

    def add(self, positions: list[int], scores: Any) -> None:
        for i, rows in zip(positions, self.writer.rows([self.ids[i] for i in positions], scores), strict=True):
            self.pending[i] = rows  # the input's rows (one, several or none), kept with its position
        self._flush()

    def _flush(self) -> None:
        if not self.header_written and self.writer.width is not None:
            self.csv.writerow(self.writer.header())
            self.header_written = True
        if not self.header_written:
            return
        while self.next in self.pending:
            rows = self.pending.pop(self.next)
            self.csv.writerows(rows)
            self.rows += len(rows)
            self.next += 1

    def close(self) -> list[Path]:
        """Finish the file (and the writer's extra files); returns every path written."""
        if not self.header_written:
            self.csv.writerow(self.writer.header())
            self.header_written = True
        self._flush()
        self.file.close()
        try:
            os.replace(self.tmp, self.out)
        except OSError as exc:
            self.tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{self.out}: could not write ({exc.strerror or exc})") from exc
        paths = [self.out, *self.writer.finish(self.out)]
        listed = skipped_list(self.out)
        listed.unlink(missing_ok=True)
        if self.skipped:
            listed.write_text("".join(f"{i}\t{reason}\n" for i, reason in self.skipped), encoding="utf-8")
            paths.append(listed)
        return paths

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)
