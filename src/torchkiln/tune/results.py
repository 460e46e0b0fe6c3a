"""A search's results, from Ray's record of the trials and each trial's own run directory: the
table (printed and `trials.csv`), `best.yaml` (the best trial's whole config, a plain run's) and
`plots/` (the metric per epoch of every trial; the ones stopped early end early, marked x)."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchkiln.callbacks.tune_report import EPOCH
from torchkiln.rundir import CONFIG, METRICS_CSV, PLOTS

log = logging.getLogger("torchkiln")
TRIALS_CSV = "trials.csv"
BEST = "best.yaml"
ERROR_FILE = "error.txt"  # a failed trial's one-line reason, in its run directory
COMPLETED, STOPPED, ERROR, UNFINISHED = "completed", "stopped early", "error", "unfinished"


@dataclass
class Trial:
    trial_id: str
    run_dir: Path
    values: dict[str, Any]
    best: float | None
    epochs: int
    status: str
    reason: str = ""
    history: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Table:
    keys: list[str]
    metric: str
    mode: str
    trials: list[Trial]

    @property
    def unfinished(self) -> list[Trial]:
        return [t for t in self.trials if t.status == UNFINISHED]

    @property
    def best(self) -> Trial | None:
        ranked = [t for t in self.trials if t.best is not None and t.status != ERROR]
        if not ranked:
            return None
        return (max if self.mode == "max" else min)(ranked, key=lambda t: t.best)


def collect(ray_dir: Path, trials_dir: Path, keys: list[str], metric: str, mode: str, epochs: int) -> Table:
    """Every trial Ray knows of, with its numbers read from its run directory's metrics.csv."""
    from ray.tune import ExperimentAnalysis

    from torchkiln.loggers.files import read_csv_rows

    trials = []
    for t in sorted(ExperimentAnalysis(str(ray_dir)).trials, key=lambda t: t.trial_id):
        run_dir = trials_dir / t.trial_id
        history = [(int(r[EPOCH]), float(r[metric])) for r in read_csv_rows(run_dir / METRICS_CSV)
                   if r.get(metric) not in (None, "")]
        values = [v for _, v in history if not math.isnan(v)]
        best = (max if mode == "max" else min)(values) if values else None
        ran = int((t.last_result or {}).get(EPOCH, 0))
        error = run_dir / ERROR_FILE
        if t.status == "ERROR":
            status, reason = ERROR, error.read_text().strip() if error.is_file() else "see Ray's error.txt"
        elif t.status == "TERMINATED":
            status, reason = (COMPLETED if ran >= epochs else STOPPED), ""
        else:
            status, reason = UNFINISHED, ""
        trials.append(Trial(t.trial_id, run_dir, {k: t.config.get(k) for k in keys}, best, ran, status,
                            reason, history))
    return Table(keys, metric, mode, trials)


def write(table: Table, search_dir: Path, metric: str, strip: Callable[[dict], dict]) -> str:
    """trials.csv, best.yaml and plots/ in the search directory; returns the table as text."""
    columns = ["trial", *table.keys, f"best {metric}", "epochs", "status", "reason"]
    rows = [[t.trial_id, *(t.values[k] for k in table.keys), t.best, t.epochs, t.status, t.reason]
            for t in table.trials]
    with open(search_dir / TRIALS_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([["" if c is None else c for c in row] for row in rows])
    best = table.best
    lines = [_format(columns, [[_show(c) for c in row] for row in rows])]
    if best is not None:
        _write_best(best, search_dir / BEST, strip)
        lines.append(f"\nbest trial {best.trial_id}: {metric} {best.best:.6g}; its config {search_dir / BEST}"
                     f" (rerun: kiln train -c {search_dir / BEST})")
    plot = _plot(table, search_dir / PLOTS)
    if plot is not None:
        lines.append(f"curves of every trial {plot}")
    lines.append(f"table {search_dir / TRIALS_CSV}")
    return "\n".join(lines)


def _write_best(best: Trial, path: Path, strip: Callable[[dict], dict]) -> None:
    from torchkiln.config.load import dump_yaml, read_file, resolve

    path.write_text(dump_yaml(resolve(strip(read_file(best.run_dir / CONFIG)), str(best.run_dir / CONFIG))))


def _show(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _format(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [columns] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _plot(table: Table, out_dir: Path) -> Path | None:
    """The metric per epoch, one line per trial: stopped early ends in x, an error is dashed."""
    drawn = [t for t in table.trials if t.history]
    if not drawn:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in drawn:
        epochs, values = zip(*t.history)
        style = "--" if t.status == ERROR else "-"
        (line,) = ax.plot(epochs, values, style, marker=".", label=f"{t.trial_id} ({t.status})")
        if t.status == STOPPED:
            ax.plot(epochs[-1], values[-1], "x", color=line.get_color(), markersize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(table.metric)
    ax.set_title(f"{table.metric} per epoch, every trial (x: stopped early)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"{table.metric.replace('/', '_')}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def progress_callback(metric: str):
    """A Ray Tune callback that logs each trial as it ends."""
    from ray import tune

    class Progress(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            log.info("trial %s ended after %s epoch(s): %s %s", trial.trial_id, result.get(EPOCH, 0), metric,
                     result.get(metric))

        def on_trial_error(self, iteration, trials, trial, **info):
            log.info("trial %s failed", trial.trial_id)

    return Progress()
