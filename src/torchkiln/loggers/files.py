"""Always-on files: metrics.csv (one row per epoch) and metrics.jsonl (epoch and step rows)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from torchkiln.loggers.base import Logger
from torchkiln.rundir import METRICS_CSV, METRICS_JSONL


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class CSVLogger(Logger):
    """One row per epoch. On resume, rows from the resumed epoch on are dropped, then appended.

    A row is appended to the open file; the file is rewritten whole only when a row brings a
    column the header lacks (so the cost per epoch does not grow with the epochs).
    """

    def __init__(self, run_dir: str | Path, filename: str = METRICS_CSV):
        self.path = Path(run_dir) / filename
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        self._file = None
        self._writer: csv.DictWriter | None = None

    def start(self, info, resume_epoch=None, resume_step=0):
        if resume_epoch is not None:
            self.rows = [r for r in read_csv_rows(self.path) if int(r["epoch"]) < resume_epoch]
        else:
            self.rows = []
        self._rewrite()

    def log_epoch(self, epoch, step, record):
        row = {"epoch": epoch, "step": step, **record}
        self.rows.append(row)
        if self._writer is None or any(k not in self.columns for k in row):
            self._rewrite()
        else:
            self._writer.writerow(row)
            self._file.flush()

    def _rewrite(self) -> None:
        self._close()
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        self.columns = columns or ["epoch", "step"]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._writer = None, None

    def finish(self, summary):
        self._close()


class JSONLLogger(Logger):
    """Step rows ({"step": ...}) and epoch rows ({"epoch": ...}), one JSON object per line."""

    def __init__(self, run_dir: str | Path, filename: str = METRICS_JSONL):
        self.path = Path(run_dir) / filename
        self._file = None

    def start(self, info, resume_epoch=None, resume_step=0):
        kept: list[str] = []
        if resume_epoch is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if ("epoch" in row and row["epoch"] < resume_epoch) or ("epoch" not in row and row["step"] <= resume_step):
                    kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))
        self._file = open(self.path, "a", buffering=1)

    def log_steps(self, rows):
        if self._file:
            self._file.write("".join(json.dumps({"step": s, **vals}) + "\n" for s, vals in rows))

    def log_epoch(self, epoch, step, record):
        if self._file:
            self._file.write(json.dumps({"epoch": epoch, "step": step, **record}) + "\n")
            self._file.flush()

    def flush(self):
        if self._file:
            self._file.flush()

    def finish(self, summary):
        if self._file:
            self._file.close()
            self._file = None
