"""What logging costs per training step, on the default config's model (SmallCNN on digits).

Trains the same model with no loggers, then with CSV + JSONL + TensorBoard at several
`logging.every_n_steps`, and reports the median epoch time of each against the bare run. Also
times the once-per-epoch validation figures (confusion matrix, misclassified grid), and prints the
per-epoch device numbers (peak memory, GPU utilization) on CUDA.

    python benchmarks/logging_overhead.py [--epochs 4] [--repeat 8] [--rounds 3] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from torchkiln.data.digits import Digits
from torchkiln.engine.trainer import Trainer
from torchkiln.loggers.base import Logger
from torchkiln.loggers.files import CSVLogger, JSONLLogger
from torchkiln.loggers.tensorboard import TensorBoardLogger
from torchkiln.metrics import build_metrics
from torchkiln.models.small import SmallCNN


class Records(Logger):
    """Keeps the epoch records (time/epoch_s and the device numbers are not in the trainer's history)."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def log_epoch(self, epoch, step, record):
        self.rows.append(dict(record))


def epoch_times(loader, device, every: int | None, epochs: int, run_dir: str) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10)
    records = Records()
    loggers = [records]
    if every is not None:
        Path(run_dir).mkdir(parents=True)
        loggers += [CSVLogger(run_dir), JSONLLogger(run_dir), TensorBoardLogger(run_dir)]
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), device=device, epochs=epochs,
                      metrics=build_metrics(["accuracy"], 10), loggers=loggers, progress=False,
                      log_every_n_steps=every or 10, grad_clip=1.0, monitor="train/loss")
    trainer.fit(loader)
    times = [row["time/epoch_s"] for row in records.rows]
    return times[1:], records.rows[-1]  # the first epoch warms up


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeat", type=int, default=8, help="copies of the digits training images per epoch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    ds = Digits()
    train = TensorDataset(ds.images.repeat(args.repeat, 1, 1, 1), ds.targets.repeat(args.repeat))
    loader = DataLoader(train, batch_size=64, shuffle=True)
    settings = {"no loggers": None, "every 1": 1, "every 10 (default)": 10, "every 50": 50}
    times: dict[str, list[float]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        # Rounds interleave the settings, and the fastest epoch of each counts: on a shared machine
        # that is the least disturbed measurement.
        for r in range(args.rounds):
            for name, every in settings.items():
                epoch_s, final = epoch_times(loader, args.device, every, args.epochs, f"{tmp}/{r}-{every}")
                times[name] += epoch_s
                extra = {k: round(v, 1) for k, v in final.items() if k.startswith(("memory/", "gpu/"))}
                if extra and r == 0:
                    print(f"{name}: {extra}")
    # Medians over every epoch of every round: one lucky bare epoch must not set the baseline.
    results = {name: statistics.median(t) for name, t in times.items()}
    for name, med in results.items():
        print(f"{name:<20} {med * 1000 / len(loader):7.3f} ms/step (median; min {min(times[name]) * 1000 / len(loader):.3f})")
    base = results["no loggers"]
    overhead = {k: round(100 * (v - base) / base, 2) for k, v in results.items() if k != "no loggers"}
    print(json.dumps({"device": str(torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")),
                      "steps_per_epoch": len(loader), "overhead_pct": overhead}, indent=1))
    figures_cost(loader)


def figures_cost(loader) -> None:
    from torchkiln.loggers import images
    from torchkiln.loggers.validation import ValidationCollector

    collector = ValidationCollector(max_images=16)
    for x, y in loader:
        collector.update(x, torch.randn(len(y), 10), y)
    sample = collector.result()
    start = time.perf_counter()
    images.confusion_image(sample)
    images.misclassified_image(sample)
    print(f"validation figures (once per epoch): {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main()
