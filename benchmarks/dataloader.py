"""Per-batch cost of the DataLoader path (num_workers 0/1/2) against the fast in-memory path.

    PYTHONPATH=src python benchmarks/dataloader.py [--device cpu|cuda] [--out benchmarks/results/dataloader.md]

Each row times whole epochs (batches moved to the device, as the Trainer does) after one
warm-up epoch and reports the median per-batch time. Runs in well under 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_model  # beside this script (run as `python benchmarks/dataloader.py`)
from torch.utils.data import Dataset, Subset

from torchkiln.data.collate import DefaultCollate
from torchkiln.data.digits import Digits
from torchkiln.data.loaders import make_loader, set_loader_epoch
from torchkiln.engine.device import move_to


class Synthetic(Dataset):
    """CIFAR-sized tensors in memory (3x32x32 float32, 10 classes)."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 32, 32, generator=g)
        self.targets = torch.randint(0, 10, (n,), generator=g)

    def fast_tensors(self):
        return self.images, self.targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def time_loader(loader, device: torch.device, epochs: int) -> float:
    """Median seconds per batch over `epochs` timed epochs (after one warm-up epoch)."""
    per_batch = []
    for epoch in range(epochs + 1):
        set_loader_epoch(loader, epoch)
        start = time.perf_counter()
        n = 0
        for batch in loader:
            batch = move_to(batch, device)
            n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch:
            per_batch.append((time.perf_counter() - start) / max(n, 1))
    return statistics.median(per_batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--synthetic", type=int, default=20000, help="samples in the CIFAR-sized data set")
    p.add_argument("--out", default="benchmarks/results/dataloader.md")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    datasets = {
        "Digits (1x8x8)": Subset(Digits(), list(range(1400))),
        f"Synthetic ({args.synthetic}x3x32x32)": Synthetic(args.synthetic),
    }
    rows = []
    for name, ds in datasets.items():
        common = dict(train=True, seed=0, collate_fn=DefaultCollate(), device=device)
        fast = make_loader(ds, args.batch_size, fast=True, **common)
        fast_s = time_loader(fast, device, args.epochs)
        rows.append((name, "fast path", "-", fast_s, 1.0))
        for workers in (0, 1, 2):
            loader = make_loader(ds, args.batch_size, num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=device.type == "cuda", **common)
            s = time_loader(loader, device, args.epochs)
            rows.append((name, "DataLoader", str(workers), s, s / fast_s))
            print(f"{name}: DataLoader workers={workers} {s * 1e6:.1f} us/batch", flush=True)
        print(f"{name}: fast path {fast_s * 1e6:.1f} us/batch", flush=True)
    lines = [
        f"# DataLoader path vs fast in-memory path (batch {args.batch_size}, device {device},"
        f" {time.strftime('%Y-%m-%d')})",
        "",
        f"torch {torch.__version__}, {cpu_model()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads; median of {args.epochs} epochs after a warm-up epoch.",
        "",
        "| data set | path | num_workers | per batch (us) | x fast path |",
        "|---|---|---|---:|---:|",
    ]
    lines += [f"| {n} | {path} | {w} | {s * 1e6:.1f} | {r:.1f} |" for n, path, w, s, r in rows]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
