"""What EMA of the weights and mixup do to digits validation accuracy, over seeds.

    PYTHONPATH=src python benchmarks/ema_mixup.py [--seeds 5] [--out benchmarks/results/ema_mixup.md]

The default config (10 epochs, early stopping off) trained as `kiln train` trains it, four ways:
as it is, with `trainer.ema`, with `data.mixup`, and with both (configs/digits-cnn-ema-mixup.yaml's
settings), each for seeds 0..N-1 (the seed drives the initial weights, the batches and the mixing;
the split stays the same). Reported: val/accuracy at the last epoch and at the best epoch (with EMA:
of the EMA weights), mean and standard deviation over the seeds, and the difference to the default
per seed (paired).
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
import yaml  # noqa: E402
from machine import machine, write_results  # noqa: E402

from torchkiln.config.load import apply_overrides, default_config_path, read_file, resolve  # noqa: E402

EMA_MIXUP = yaml.safe_load((_ROOT / "configs" / "digits-cnn-ema-mixup.yaml").read_text())
EMA = "trainer.ema=" + yaml.safe_dump(EMA_MIXUP["trainer"]["ema"], default_flow_style=True).strip()
MIXUP = "data.mixup=" + yaml.safe_dump(EMA_MIXUP["data"]["mixup"], default_flow_style=True).strip()
VARIANTS = {"default": [], "+ EMA": [EMA], "+ mixup": [MIXUP], "+ EMA + mixup": [EMA, MIXUP]}


def run(overrides: list[str], seed: int, workdir: Path) -> tuple[float, float]:
    """(last epoch's val/accuracy, best val/accuracy) of one run."""
    from torchkiln.commands.train import train

    data = apply_overrides(read_file(default_config_path()), [
        *overrides, f"seed={seed}", "data.split_seed=42", "trainer.early_stop=null", f"output_dir={workdir}",
        "logging.progress=false", "logging.tensorboard=false", "logging.plots=false"])
    _, summary = train(resolve(data, "ema_mixup"), progress=False)
    return summary["final"]["val/accuracy"], summary["best"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/ema_mixup.md")
    args = p.parse_args(argv)
    logging.getLogger("torchkiln").setLevel(logging.WARNING)
    load_start = os.getloadavg()[0]
    results: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-ema-mixup-") as tmp:
        for seed in range(args.seeds):  # variants interleaved per seed: the machine's load hits all alike
            for name, overrides in VARIANTS.items():
                results.setdefault(name, []).append(run(overrides, seed, Path(tmp)))
                print(f"seed {seed} {name}: last {results[name][-1][0]:.4f}, best {results[name][-1][1]:.4f}",
                      flush=True)
    base = results["default"]

    def stats(values: list[float]) -> str:
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"

    lines = [
        f"# EMA and mixup on digits: validation accuracy over {args.seeds} seeds ({time.strftime('%Y-%m-%d')})",
        "",
        "The default config (SmallCNN, AdamW + OneCycleLR, label smoothing 0.1, 10 epochs, early stopping off),"
        f" seeds 0..{args.seeds - 1}, the same 360-sample validation split. EMA: `{EMA}`; mixup: `{MIXUP}`."
        " With EMA the validated weights are the EMA's. Mean ± standard deviation over seeds; the"
        " difference to the default is paired by seed.",
        f"Machine: {machine()}, torch {torch.__version__}; load average {load_start:.2f} at the start,"
        f" {os.getloadavg()[0]:.2f} at the end. Command: `PYTHONPATH=src python benchmarks/ema_mixup.py"
        f" --seeds {args.seeds}`.",
        "",
        "| variant | val/accuracy, last epoch | val/accuracy, best epoch | last - default (mean, min..max) |",
        "|---|---:|---:|---:|",
    ]
    for name, rows in results.items():
        diff = [r[0] - b[0] for r, b in zip(rows, base)]
        shown = "-" if name == "default" else f"{statistics.mean(diff):+.4f} ({min(diff):+.4f}..{max(diff):+.4f})"
        lines.append(f"| {name} | {stats([r[0] for r in rows])} | {stats([r[1] for r in rows])} | {shown} |")
    write_results(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
