"""Time to accuracy: wall time and epochs for each config in configs/ to reach a validation accuracy.

    PYTHONPATH=src python benchmarks/time_to_accuracy.py [--target 0.98] [--seeds 5] [--out benchmarks/results/time_to_accuracy.md]

Each config (the default first, then every configs/*.yaml) trains as `kiln train` does (run
directory, logs, checkpoints) once per seed, with early stopping off and the run stopped at the
end of the first epoch whose val/accuracy reaches the target. The time is the wall time from the
start of training (the model built) to the end of that epoch. Reported per config: the median
over seeds of the time and of the epochs, how many seeds reached the target within the
config's epochs, and the fastest config.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "src" / "torchkiln").is_dir():
    sys.path.insert(0, str(_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # beside it: machine.py

import torch  # noqa: E402
from machine import machine, write_results  # noqa: E402

from torchkiln.config.load import apply_overrides, default_config_path, read_file, resolve  # noqa: E402
from torchkiln.loggers.base import Logger  # noqa: E402


class Reached(Exception):
    """Raised from a logger at the end of the epoch that reached the target."""


class StopAtTarget(Logger):
    """Notes when each epoch ends and stops the run once `metric` reaches `target`."""

    def __init__(self, metric: str, target: float):
        self.metric, self.target = metric, target
        self.started = 0.0
        self.reached: tuple[int, float] | None = None  # (epoch, seconds)
        self.last_epoch = 0

    def start(self, info, resume_epoch=None, resume_step=0):
        self.started = time.perf_counter()

    def log_epoch(self, epoch, step, record):
        self.last_epoch = epoch
        if record.get(self.metric, float("-inf")) >= self.target:
            self.reached = (epoch, time.perf_counter() - self.started)
            raise Reached


def measure(cfg_path: Path, seed: int, target: float, workdir: Path
            ) -> tuple[int | None, float | None, float, int]:
    """(epochs, seconds of training) to reach the target, or (None, None) when it was not reached;
    the whole run's seconds (config to stop: data, model, run directory too); the epochs run."""
    from torchkiln.commands import train as run

    data = apply_overrides(read_file(cfg_path), [f"seed={seed}", "trainer.early_stop=null",
                                                 f"output_dir={workdir}", "logging.progress=false"])
    cfg = resolve(data, str(cfg_path))
    stopper = StopAtTarget("val/accuracy", target)
    started = time.perf_counter()
    try:
        run.train(cfg, progress=False, loggers=[stopper])  # what `kiln train` builds, plus the stopper
    except Reached:
        pass
    whole = time.perf_counter() - started
    if stopper.reached is None:
        return None, None, whole, stopper.last_epoch
    return stopper.reached[0], stopper.reached[1], whole, stopper.last_epoch


def configs(paths: list[str] | None) -> list[Path]:
    if paths:
        return [Path(p) for p in paths]
    found = [default_config_path()]
    found += sorted(p for p in (_ROOT / "configs").glob("*.yaml")
                    if p.read_text() != default_config_path().read_text())  # the default's copy once
    return found



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=0.98, help="val/accuracy to reach")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--configs", nargs="*", help="config files (default: the default config and configs/*.yaml)")
    p.add_argument("--out", default="benchmarks/results/time_to_accuracy.md")
    args = p.parse_args(argv)
    logging.getLogger("torchkiln").setLevel(logging.WARNING)
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-tta-") as tmp:
        for cfg_path in configs(args.configs):
            name = "default (src/torchkiln/configs/default.yaml)" if cfg_path == default_config_path() \
                else str(cfg_path.relative_to(_ROOT) if cfg_path.is_relative_to(_ROOT) else cfg_path)
            results = []
            for seed in range(args.seeds):
                epochs, seconds, whole, ran = measure(cfg_path, seed, args.target, Path(tmp))
                results.append((epochs, seconds, whole))
                shown = f"{epochs} epochs, {seconds:.2f} s" if epochs else f"not reached in {ran} epochs"
                print(f"{name} seed {seed}: {shown}", flush=True)
            reached = [r for r in results if r[0] is not None]
            rows.append((name, reached, len(results)))
    lines = [
        f"# Time to {args.target:.0%} validation accuracy on digits ({time.strftime('%Y-%m-%d')})",
        "",
        f"Each config as `kiln train` runs it (logs, checkpoints; early stopping off), seeds 0..{args.seeds - 1},"
        f" stopped at the end of the first epoch with val/accuracy >= {args.target}. Seconds: from the start of"
        f" training to the end of that epoch; whole run: from the config to the stop (data, model, run"
        f" directory, the imports already paid). Medians over the seeds that reached it. Machine: {machine()}, torch {torch.__version__};"
        f" load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.",
        "",
        "| config | reached | epochs (median) | seconds (median) | seconds (min-max) | whole run (s, median) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    best = None
    for name, reached, n in rows:
        if reached:
            med_e = statistics.median(r[0] for r in reached)
            secs = [r[1] for r in reached]
            med_s = statistics.median(secs)
            whole = statistics.median(r[2] for r in reached)
            lines.append(f"| {name} | {len(reached)}/{n} | {med_e:g} | {med_s:.2f} | {min(secs):.2f}-{max(secs):.2f}"
                         f" | {whole:.2f} |")
            if best is None or med_s < best[1]:
                best = (name, med_s)
        else:
            lines.append(f"| {name} | 0/{n} | - | - | - | - |")
    lines += ["", f"Fastest: {best[0]}, {best[1]:.2f} s (median)." if best else "No config reached the target."]
    write_results(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
