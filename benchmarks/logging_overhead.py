"""What logging costs per training step, on the default config's model (SmallCNN on digits).

Trains the same model with no loggers, then with CSV + JSONL + TensorBoard at several
`logging.every_n_steps`, in interleaved rounds, and reports two measures of the cost:

- **in logging code**: seconds spent inside the trainer's per-step logging (recording a step's
  scalars, and each flush: one device-to-host copy, the rows to every logger), timed directly
  around those calls, as a share of the step time. Direct, and almost untouched by the machine's
  noise.
- **paired slowdown**: each round's median epoch against that round's run without loggers,
  median over rounds. It includes what the direct timer cannot see (cache effects, the kernel's
  writes), and the machine's noise (a few percent on a shared 2-core VM).

Also times the validation pictures (confusion matrix, misclassified grid) drawn at the epochs
`logging.images_every` picks, and prints the per-epoch device numbers (peak memory, GPU
utilization) on CUDA.

    python benchmarks/logging_overhead.py [--epochs 4] [--repeat 8] [--rounds 5] [--device auto]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run from a checkout: measure the torchkiln beside this script, installed or not.
_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "torchkiln").is_dir():
    sys.path.insert(0, str(_SRC))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # beside it: machine.py

import torch  # noqa: E402
from machine import machine, write_results  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from torchkiln.callbacks.logging_hub import LoggerHub  # noqa: E402
from torchkiln.data.digits import Digits  # noqa: E402
from torchkiln.engine.settings import make_trainer  # noqa: E402
from torchkiln.loggers.base import Logger  # noqa: E402
from torchkiln.loggers.files import CSVLogger, JSONLLogger  # noqa: E402
from torchkiln.loggers.tensorboard import TensorBoardLogger  # noqa: E402
from torchkiln.metrics import build_metrics  # noqa: E402
from torchkiln.models.small import SmallCNN  # noqa: E402


class Records(Logger):
    """Keeps the epoch records (time/epoch_s and the device numbers are not in the trainer's history)."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def log_epoch(self, epoch, step, record):
        self.rows.append(dict(record))


class LoggingClock:
    """Seconds spent inside LoggerHub.on_step_end and LoggerHub.flush_steps (outermost calls only)."""

    def __init__(self):
        self.seconds = 0.0
        self._depth = 0
        self._saved = {}

    def __enter__(self):
        for name in ("on_step_end", "flush_steps"):
            real = getattr(LoggerHub, name)
            self._saved[name] = real

            def timed(trainer, *args, _real=real, **kwargs):
                self._depth += 1
                start = time.perf_counter()
                try:
                    return _real(trainer, *args, **kwargs)
                finally:
                    self._depth -= 1
                    if self._depth == 0:
                        self.seconds += time.perf_counter() - start

            setattr(LoggerHub, name, timed)
        return self

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(LoggerHub, name, real)


def run(loader, device, every: int | None, epochs: int, run_dir: str) -> tuple[list[float], float, dict]:
    """(epoch seconds after the first, seconds in logging code per step, last epoch record)."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10)
    records = Records()
    loggers: list[Logger] = [records]
    if every is not None:
        Path(run_dir).mkdir(parents=True)
        loggers += [CSVLogger(run_dir), JSONLLogger(run_dir), TensorBoardLogger(run_dir)]
    trainer = make_trainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), device=device, epochs=epochs,
                      metrics=build_metrics(["accuracy"], 10), loggers=loggers, progress=False,
                      log_every_n_steps=every or 10, grad_clip=1.0, monitor="train/loss")
    with LoggingClock() as clock:
        trainer.fit(loader)
    times = [row["time/epoch_s"] for row in records.rows]
    return times[1:], clock.seconds / (epochs * len(loader)), records.rows[-1]  # the first epoch warms up


def pictures_cost(loader) -> float:
    from torchkiln.loggers import images
    from torchkiln.loggers.validation import ValidationCollector

    collector = ValidationCollector(max_images=16)
    for x, y in loader:
        collector.update(x, torch.randn(len(y), 10), y)
    (sample,) = collector.result()  # one view: single-label classification
    images.confusion_image(sample)  # fonts and glyphs, once per process
    start = time.perf_counter()
    for _ in range(10):
        images.png_bytes(images.confusion_image(sample))
        images.png_bytes(images.misclassified_image(sample))
    return (time.perf_counter() - start) / 10


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeat", type=int, default=8, help="copies of the digits training images per epoch")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results/logging_overhead.md")
    args = p.parse_args(argv)
    ds = Digits()
    train = TensorDataset(ds.images.repeat(args.repeat, 1, 1, 1), ds.targets.repeat(args.repeat))
    loader = DataLoader(train, batch_size=64, shuffle=True)
    settings = {"no loggers": None, "every_n_steps 1": 1, "every_n_steps 10 (default)": 10, "every_n_steps 50": 50}
    epochs: dict[str, list[list[float]]] = {name: [] for name in settings}
    inside: dict[str, list[float]] = {name: [] for name in settings}
    device_numbers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            names = list(settings)
            for name in names[r % len(names):] + names[:r % len(names)]:  # interleaved, rotated
                epoch_s, per_step, final = run(loader, args.device, settings[name], args.epochs, f"{tmp}/{r}-{name}")
                epochs[name].append(epoch_s)
                inside[name].append(per_step)
                device_numbers.update({k: round(v, 1) for k, v in final.items() if k.startswith(("memory/", "gpu/"))})
                print(f"round {r + 1}/{args.rounds} {name:<28} median epoch {statistics.median(epoch_s):.3f} s"
                      f"  in logging code {per_step * 1e6:.1f} us/step", flush=True)
    steps = len(loader)
    base_rounds = [statistics.median(e) for e in epochs["no loggers"]]
    step_s = statistics.median(t for e in epochs["no loggers"] for t in e) / steps
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    lines = [
        f"# Logging overhead ({time.strftime('%Y-%m-%d')})",
        "",
        f"`python benchmarks/logging_overhead.py --rounds {args.rounds}` on {machine()}, {device}; torch"
        f" {torch.__version__}, Python {platform.python_version()}. SmallCNN on digits (x{args.repeat} copies,"
        f" {steps} steps of 64 per epoch), {args.epochs} epochs per run (the first not counted), {args.rounds}"
        " interleaved rounds. Loggers: CSV + JSONL + TensorBoard.",
        "",
        "- **in logging code**: time inside the trainer's per-step logging (recording, and the flush every"
        " `every_n_steps`: one device-to-host copy, rows to every logger), per step, and as a share of the"
        " step time without loggers. Median over rounds.",
        "- **paired slowdown**: each round's median epoch against the same round's run without loggers;"
        " median (lowest-highest) over rounds. It also holds cache effects, the kernel's file writes and the machine's noise.",
        "- **fastest epoch**: the fastest epoch of all rounds against the fastest without loggers (other work"
        " on a shared machine only ever adds time).",
        "",
        "| loggers | ms/step (median) | in logging code (us/step) | share of step time | paired slowdown"
        " | fastest epoch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    fastest_base = min(t for e in epochs["no loggers"] for t in e)
    for name in settings:
        ms = statistics.median(t for e in epochs[name] for t in e) / steps * 1e3
        us = statistics.median(inside[name]) * 1e6
        if settings[name] is None:
            lines.append(f"| {name} (the trainer still records rows for the timing logger) | {ms:.3f} | {us:.1f} |"
                         f" {100 * us / 1e6 / step_s:.2f}% | - | - |")
            continue
        ratios = sorted(statistics.median(e) / b for e, b in zip(epochs[name], base_rounds))
        mid = statistics.median(ratios)
        lines.append(f"| {name} | {ms:.3f} | {us:.1f} | {100 * us / 1e6 / step_s:.2f}% |"
                     f" {100 * (mid - 1):+.1f}% ({100 * (ratios[0] - 1):+.1f} to {100 * (ratios[-1] - 1):+.1f}) |"
                     f" {100 * (min(t for e in epochs[name] for t in e) / fastest_base - 1):+.1f}% |")
    pictures = pictures_cost(loader)
    lines += [
        "",
        "Where a paired range spans zero (or every_n_steps 1 comes out faster than none), whole-epoch timing"
        " cannot resolve the cost on this machine; the direct timer is then the measure.",
        "",
        f"Validation pictures (confusion matrix and misclassified grid, drawn and PNG-encoded): {pictures * 1e3:.1f} ms"
        " per epoch that gets them; `images_every: auto` draws them only as often as keeps them under 1% of the run.",
    ]
    if device_numbers:
        lines.append(f"Device numbers of the last epoch: {device_numbers}")
    write_results(lines, args.out)
    return 0



if __name__ == "__main__":
    sys.exit(main())
