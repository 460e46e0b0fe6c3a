"""`kiln predict` throughput and `kiln export` parity on a real image folder.

    PYTHONPATH=src python benchmarks/predict_export.py [--images 1024] [--size 64] [--device auto]
        [--out benchmarks/results/predict_export.md]

A CsvImages run (3 classes of generated PNGs, SmallCNN, 1 epoch) is trained in this process; then
side by side on the same folder of `--images` PNGs: `Predictor.predict` rows/s without TTA, with
`--tta flip` and `--tta flip+crops` (decode, eval transforms, batched forward under inference_mode,
CSV), and the same rows without the CSV (`predictor(paths)`), the median of `--repeats` rounds.
Then `kiln export --format onnx` and `--format pt2`: the max abs / rel differences to the eager
model at batch 1, 3 and 7 on validation images (what model.json stores). On CUDA the run's
precision is bf16 (autocast). About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
        img[..., i % 3] += 120
        Image.fromarray(img).save(folder / f"{i:05d}.png")
        names.append(f"{i:05d}.png")
    return names


def train_run(home: Path, size: int, device: str) -> Path:
    import yaml

    from torchkiln.commands.train import train
    from torchkiln.config.load import resolve

    names = make_images(home / "train", 120, size, seed=1)
    (home / "train.csv").write_text("image,label\n" + "".join(f"train/{n},{'abc'[i % 3]}\n" for i, n in enumerate(names)))
    precision = "bf16" if device != "cpu" else "32"
    cfg = {"name": "bench", "seed": 0, "output_dir": str(home / "runs"),
           "data": {"dataset": {"type": "CsvImages", "args": {"csv_file": str(home / "train.csv")}},
                    "val_split": 0.2, "batch_size": 32,
                    "transforms": {"eval": [{"type": "Normalize", "args": {"mean": [0.5] * 3, "std": [0.25] * 3}}]}},
           "model": {"type": "SmallCNN", "args": {"in_channels": 3}},
           "optimizer": {"type": "Adam", "args": {"lr": 0.01}},
           "trainer": {"epochs": 1, "precision": precision, "device": device},
           "logging": {"progress": False, "plots": False, "tensorboard": False, "images": 0}}
    run, _ = train(resolve(yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False))), progress=False)
    return run


def rows_per_s(run: Path, folder: Path, repeats: int, device: str) -> dict[str, float]:
    import torchkiln

    predictor = torchkiln.load(run, device=device)
    paths = sorted(folder.glob("*.png"))
    predictor.predict(folder, folder.parent / "warm.csv", batch_size=64)  # first-call costs out of the rounds
    timings: dict[str, list[float]] = {"predict (no TTA)": [], "predict --tta flip": [], "predict --tta flip+crops": [],
                                       "predictor(paths), no CSV": []}
    for _ in range(repeats):
        for tta in ("none", "flip", "flip+crops"):
            name = "predict (no TTA)" if tta == "none" else f"predict --tta {tta}"
            result = predictor.predict(folder, folder.parent / "p.csv", tta=tta, batch_size=64)
            timings[name].append(result.rows_per_s)
        started = time.perf_counter()
        predictor(paths, batch_size=64)
        timings["predictor(paths), no CSV"].append(len(paths) / (time.perf_counter() - started))
    return {k: statistics.median(v) for k, v in timings.items()}


def parity(run: Path) -> dict[str, dict]:
    from torchkiln.commands.export import export

    out = {}
    for fmt in ("onnx", "pt2"):
        started = time.perf_counter()
        files = export(run, fmt, out_dir=run / f"export-{fmt}")
        card = json.loads(Path(files[1]).read_text())
        out[fmt] = {"batches": card["parity"]["batches"], "seconds": time.perf_counter() - started}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "predict_export.md"))
    args = p.parse_args(argv)
    import torch
    from machine import machine

    from torchkiln.commands.logs import console

    console(quiet=True)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        run = train_run(home, args.size, device)
        make_images(home / "eval", args.images, args.size, seed=2)
        speeds = rows_per_s(run, home / "eval", args.repeats, device)
        checks = parity(run)
    where = torch.cuda.get_device_name() if device == "cuda" else machine()
    lines = [f"# kiln predict throughput and export parity ({datetime.date.today()}, {where}, torch {torch.__version__})",
             "", f"`python benchmarks/predict_export.py --images {args.images} --size {args.size} --repeats {args.repeats}"
             f" --device {device}`: SmallCNN, {args.images} PNGs of {args.size}x{args.size}, batch 64, median of"
             f" {args.repeats} rounds.", "", "| path | rows/s |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in speeds.items()]
    lines += ["", "Parity against the eager model on validation images (atol 1e-4 / rtol 1e-3):", "",
              "| format | batch | max abs diff | max rel diff | export + check (s) |", "|---|---:|---:|---:|---:|"]
    for fmt, c in checks.items():
        for b, d in c["batches"].items():
            lines.append(f"| {fmt} | {b} | {d['max_abs']:.3g} | {d['max_rel']:.3g} | {c['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
