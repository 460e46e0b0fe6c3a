"""`kiln report RUN_DIR...`: compare runs (finished or still training) from their own files.

Reads each run's config.yaml and metrics.csv (summary.json when there is one), then gives a table
of the config keys that differ and the best/final metrics, one PNG with the runs' curves overlaid
and an HTML page embedding both.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchkiln.callbacks.monitor import improved
from torchkiln.config.yamlio import load_yaml
from torchkiln.errors import ConfigError, KilnError
from torchkiln.loggers.files import read_csv_rows
from torchkiln.rundir import CONFIG, METRICS_CSV, METRICS_JSONL, SUMMARY


def main(args: argparse.Namespace) -> int:
    """Print the comparison table and where the curves and the page were written."""
    result = report(args.run_dirs, args.out)
    print(result["text"])
    print(f"\nwrote {result['png']} and {result['html']}")
    return 0


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flat: dotted key -> value
    rows: list[dict[str, float]]
    summary: dict[str, Any] | None
    monitor: str = "val/loss"
    mode: str = "min"
    steps: list[dict[str, float]] = field(default_factory=list)  # metrics.jsonl's per-step rows

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def status(self) -> str:
        """finished, stopped early (epoch N), stopped (epoch N of M: a signal or a crash), failed
        (epoch N of M: an error ended it; summary.json and train.log say which), in progress."""
        if self.summary is None:
            return "in progress"
        done = self.summary.get("epochs_completed")
        if self.summary.get("stopped_early"):
            return f"stopped early (epoch {done})"
        planned = self.config.get("trainer.epochs")
        if self.summary.get("error"):
            return f"failed (epoch {done} of {planned})"
        if isinstance(done, int) and isinstance(planned, int) and done < planned:
            return f"stopped (epoch {done} of {planned})"
        return "finished"

    def best(self) -> tuple[float, int] | None:
        """The best monitored value and its epoch, by the Trainer's rule (`trainer.min_delta` included)."""
        min_delta = self.config.get("trainer.min_delta") or 0.0
        best: tuple[float, int] | None = None
        for row in self.rows:
            value = row.get(self.monitor, math.nan)
            if improved(value, best[0] if best else None, self.mode, min_delta):
                best = (value, int(row["epoch"]))
        return best


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data} if prefix else {}


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() or (path / METRICS_CSV).is_file()


def expand(paths: list[str | Path]) -> list[Path]:
    """Run directories as given; a folder of runs (runs/<name>) stands for each run inside it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ConfigError(f"{p}: no such run directory")
        if is_run_dir(p):
            out.append(p)
            continue
        inner = sorted(q for q in p.iterdir() if q.is_dir() and is_run_dir(q))
        if not inner:
            raise ConfigError(f"{p}: not a run directory (no config.yaml or metrics.csv in it or below it)")
        out += inner
    return out


def load_run(path: Path) -> Run:
    cfg_path, summary_path = path / CONFIG, path / SUMMARY
    config = load_yaml(cfg_path.read_text()) if cfg_path.is_file() else {}
    rows = [{k: _number(v) for k, v in row.items()} for row in read_csv_rows(path / METRICS_CSV)]
    summary = None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            summary = None  # being written right now: treat the run as in progress
    run = Run(path, flatten(config or {}), rows, summary, steps=_step_rows(path / METRICS_JSONL))
    run.monitor = (summary or {}).get("monitor") or run.config.get("trainer.monitor") or "val/loss"
    run.mode = (summary or {}).get("mode") or run.config.get("trainer.mode") or _monitor_mode(config, run.monitor)
    return run


def _monitor_mode(config: dict[str, Any] | None, monitor: str) -> str:
    """The direction the run's task gives its monitor (the Trainer's default for `trainer.mode`);
    the base task's rule when the run's task cannot be built here (a user task not importable)."""
    from torchkiln.tasks import Task, build_task

    try:
        task = build_task((config or {}).get("task") or "classification")
    except KilnError:
        task = Task()
    return task.monitor_mode(monitor)


def _step_rows(path: Path) -> list[dict[str, float]]:
    """The per-step rows of metrics.jsonl (a line cut short by a kill is left out)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "epoch" not in row and "step" in row:
            rows.append(row)
    return rows


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config})
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs}) > 1]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per differing config key, then the metrics; one column per run."""
    header = ["", *[f"[{i + 1}]" for i in range(len(runs))]]
    rows = [[k, *[_fmt(r.config.get(k)) for r in runs]] for k in differing_keys(runs)]
    rows.append(["status", *[r.status for r in runs]])
    rows.append(["epochs", *[str(len(r.rows)) for r in runs]])
    for monitor in dict.fromkeys(r.monitor for r in runs):
        cells = []
        for r in runs:
            best = r.best() if r.monitor == monitor else None
            cells.append("-" if best is None else f"{best[0]:.4g} (epoch {best[1]})")
        rows.append([f"best {monitor}", *cells])
    finals = sorted({k for r in runs for k in (r.rows[-1] if r.rows else {})
                     if k.startswith(("train/loss", "val/"))})
    for key in finals:
        rows.append([f"final {key}", *[_fmt(r.rows[-1].get(key)) if r.rows else "-" for r in runs]])
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_overlay(runs: list[Run], path: Path) -> Path:
    """Loss, each run's monitored metric and the LR against epoch; one colour per run,
    solid for train and dashed for val."""
    from torchkiln.loggers.figures import pyplot, save

    plt = pyplot()
    names = ["loss", *dict.fromkeys(r.monitor.split("/", 1)[-1] for r in runs)]
    names = list(dict.fromkeys(names))
    panels = [*names, "lr"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        epochs = [int(row["epoch"]) for row in run.rows]
        for ax, name in zip(axes[0], names):
            for split, style in (("train", "-"), ("val", "--")):
                ys = [row.get(f"{split}/{name}", math.nan) for row in run.rows]
                if any(math.isfinite(y) for y in ys):
                    ax.plot(epochs, ys, style, color=color, marker="o", ms=3, label=f"[{i + 1}] {split}")
        _plot_lr(axes[0][-1], run, color, f"[{i + 1}] ")
    for ax, name in zip(axes[0], panels):
        ax.set_title("learning rate" if name == "lr" else name)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def _plot_lr(ax: Any, run: Run, color: str, label: str) -> None:
    """The LR at every logged optimizer step (metrics.jsonl), on the epoch axis; the epoch ends
    when a run has no step rows. Steps are placed by the epoch rows' step counts."""
    ends = [(int(row["step"]), int(row["epoch"])) for row in run.rows if math.isfinite(row.get("step", math.nan))]
    keys = sorted({k for row in run.steps for k in row if k.startswith("lr/")})
    if keys and ends:
        xs = [_epoch_of(int(row["step"]), ends) for row in run.steps]
        for k, key in enumerate(keys):
            ax.plot(xs, [row.get(key, math.nan) for row in run.steps], ("-", ":", "-.")[k % 3], color=color,
                    lw=1.2, label=f"{label}{key.split('/', 1)[1]}")
        return
    epochs = [int(row["epoch"]) for row in run.rows]
    for k, key in enumerate(sorted(k for k in (run.rows[0] if run.rows else {}) if k.startswith("lr/"))):
        ax.plot(epochs, [row.get(key, math.nan) for row in run.rows], ("-", ":", "-.")[k % 3], color=color,
                marker="o", ms=3, label=f"{label}{key.split('/', 1)[1]} (epoch end)")


def _epoch_of(step: int, ends: list[tuple[int, int]]) -> float:
    """A global step as a fractional epoch, from (last step, epoch) at each epoch's end."""
    prev_step, prev_epoch = 0, 0
    for end_step, epoch in ends:
        if step <= end_step:
            span = max(1, end_step - prev_step)
            return prev_epoch + (step - prev_step) / span * (epoch - prev_epoch)
        prev_step, prev_epoch = end_step, epoch
    span = max(1, ends[-1][0] - (ends[-2][0] if len(ends) > 1 else 0))
    return prev_epoch + (step - prev_step) / span


def write_html(runs: list[Run], header: list[str], rows: list[list[str]], png: Path, path: Path) -> Path:
    image = base64.b64encode(png.read_bytes()).decode()
    esc = html.escape
    legend = "".join(f"<li>[{i + 1}] <code>{esc(str(r.path))}</code></li>" for i, r in enumerate(runs))
    head = "".join(f"<th>{esc(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    path.write_text(
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>kiln report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%}</style>"
        f"</head><body><h1>kiln report</h1><ol style='list-style:none;padding:0'>{legend}</ol>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"<h2>curves</h2><img alt='curves' src='data:image/png;base64,{image}'></body></html>\n"
    )
    return path


def report(paths: list[str | Path], out: str | Path = "kiln-report") -> dict[str, Any]:
    """Compare runs; writes OUT/curves.png and OUT/index.html; returns the table and the paths."""
    runs = [load_run(p) for p in expand(paths)]
    header, rows = table(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_overlay(runs, out / "curves.png")
    page = write_html(runs, header, rows, png, out / "index.html")
    legend = "\n".join(f"[{i + 1}] {r.path}" for i, r in enumerate(runs))
    return {"runs": runs, "header": header, "rows": rows, "png": png, "html": page,
            "text": f"{legend}\n\n{format_table(header, rows)}"}
