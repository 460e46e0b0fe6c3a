"""What `data.on_error: skip` costs: one epoch over image folders of 1k, 10k and 50k small
images with 0.1% broken files (truncated PNGs that fail only when decoded), against
`on_error: raise` over the same folder with the broken files removed.

Each variant is built as `kiln train` builds it (`build_data`: ImageFolder, split, transforms,
and under skip, the split's SkipBroken reader) and read once through the training DataLoader
(batch 64, workers 0). The times include building the data set (listing and checking the files)
and the epoch; medians of `--repeats` interleaved rounds (a folder under 10k images gets
proportionally more: 30 at 1k, whose 0.1 s epochs scatter by a third).

    python benchmarks/broken_files.py [--sizes 1000,10000,50000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402


def make_folder(root: Path, n: int, broken_frac: float = 0.001) -> tuple[Path, Path]:
    """root/skip (n files, some broken) and root/clean (the same without the broken ones)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    skip, clean = root / "skip", root / "clean"
    broken = set(rng.choice(n, size=max(1, round(n * broken_frac)), replace=False).tolist())
    pixels = rng.integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8)
    for i in range(n):
        cls = f"c{i % 4}"
        for d in (skip, clean):
            (d / cls).mkdir(parents=True, exist_ok=True)
        path = clean / cls / f"{i:06d}.png"
        Image.fromarray(pixels[i % 16]).save(path)
        data = path.read_bytes()
        if i in broken:
            path.unlink()
            (skip / cls / f"{i:06d}.png").write_bytes(data[: len(data) // 2])
        else:
            (skip / cls / f"{i:06d}.png").hardlink_to(path)
    return skip, clean


def epoch_seconds(folder: Path, on_error: str) -> tuple[float, int]:
    from torchkiln.config.build import build_data, build_loaders
    from torchkiln.config.load import resolve

    raw = {"name": "b", "seed": 0, "output_dir": "/tmp/unused",
           "data": {"dataset": {"type": "ImageFolder", "args": {"root": str(folder)}}, "val_split": 0.0,
                    "test_split": 0.0, "batch_size": 64, "num_workers": 0, "on_error": on_error,
                    "max_skipped": 0.01, "transforms": {"train": [], "eval": []}},
           "model": {"type": "SmallCNN", "args": {"num_classes": 4, "in_channels": 3}},
           "trainer": {"epochs": 1, "monitor": "train/loss"}}
    cfg = resolve(raw, "bench")
    t0 = time.perf_counter()
    data = build_data(cfg)
    loaders = build_loaders(cfg, data)
    seen = sum(len(batch[0]) for batch in loaders["train"])
    return time.perf_counter() - t0, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        root = Path(tempfile.mkdtemp(prefix="kiln-broken-"))
        try:
            skip, clean = make_folder(root, n)
            epoch_seconds(clean, "raise")  # the page cache warm for both
            times: dict[str, list[float]] = {"raise": [], "skip": []}
            rounds = max(args.repeats, round(args.repeats * 10_000 / n))  # short epochs scatter more
            for _ in range(rounds):
                for mode, folder in (("raise", clean), ("skip", skip)):
                    seconds, seen = epoch_seconds(folder, mode)
                    assert seen in (n, n - round(n * 0.001)) or mode == "skip", (mode, seen)
                    times[mode].append(seconds)
            r, s = statistics.median(times["raise"]), statistics.median(times["skip"])
            ratios = [b / a for a, b in zip(times["raise"], times["skip"])]
            rows.append(f"| {n} | {max(1, round(n * 0.001))} | {r:.2f} | {s:.2f} | {s / r:.3f}x |"
                        f" {min(ratios):.3f}-{max(ratios):.3f} |")
            print(rows[-1], flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    text = (f"# on_error: skip vs raise, one epoch\n\n{datetime.date.today()}, {machine()}."
            f" `python benchmarks/broken_files.py --sizes {args.sizes} --repeats {args.repeats}`\n\n"
            "| images | broken | raise, broken removed (s) | skip (s) | skip / raise | (range, paired) |\n"
            "|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
