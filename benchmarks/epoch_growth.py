"""Does torchkiln's cost per epoch grow with the epochs? A 200-epoch digits run, against the hand loop.

`benchmarks/overhead.py`'s setup: the default config's SmallCNN on the digits, the same batches
and dropout masks, trained by the hand loop (index slicing) and by torchkiln with its defaults
(what `kiln train` does: history, metrics.csv/jsonl, TensorBoard, best.ckpt and last.ckpt every
epoch, the plots at the end). Each epoch is timed from its first training step to the next
epoch's; the extra time per epoch is torchkiln's epoch minus the hand loop's epoch of the same
index, the median over `--repeats` interleaved rounds. The target: the last 20 epochs' extra at
most the first 20 epochs' + 10%. The end of the run (the last epoch's end to the return: the
plots, summary.json, the last files) is reported for the whole run's length.

    python benchmarks/epoch_growth.py [--epochs 200] [--repeats 3] [--out benchmarks/results/epoch_growth.md]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402
from machine import machine, write_results  # noqa: E402

HAND, KILN = "hand-slicing", "torchkiln-defaults"


def epoch_times(name: str, setup: overhead.Setup) -> tuple[list[float], float]:
    """Each epoch's seconds (first training step to the next epoch's; the last one to the end of
    its validation forward) and the seconds from there to the run's return (the end of the run;
    with the run directory's removal, the same for both)."""
    timing, _ = overhead.run_variant(name, setup)
    returned = time.perf_counter()
    starts = timing.starts
    last_eval_end = timing.evals[-1][1]
    epochs = [b - a for a, b in zip(starts, starts[1:])] + [last_eval_end - starts[-1]]
    return epochs, returned - last_eval_end


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=int, default=20, help="epochs compared at each end")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    w = args.window
    with tempfile.TemporaryDirectory(prefix="kiln-growth-") as tmp:
        setup = overhead.make_setup(args.epochs, Path(tmp), [])
        short = overhead.make_setup(w, Path(tmp), [])
        overhead.run_variant(HAND, short)  # imports and first-call costs paid untimed
        overhead.run_variant(KILN, short)
        runs: dict[str, list[list[float]]] = {HAND: [], KILN: []}
        ends: dict[str, list[float]] = {HAND: [], KILN: []}
        for _ in range(args.repeats):
            for name in (HAND, KILN):
                epochs, end = epoch_times(name, setup)
                runs[name].append(epochs)
                ends[name].append(end)
    n = args.epochs
    per_epoch = {name: [statistics.median(r[i] for r in rs) for i in range(n)] for name, rs in runs.items()}
    extra = [k - h for k, h in zip(per_epoch[KILN], per_epoch[HAND])]
    # The first epoch carries one-time costs (the first plots' and files' set-up): epochs 2..w+1.
    first, last = extra[1:w + 1], extra[n - w:]
    first_ms, last_ms = statistics.mean(first) * 1e3, statistics.mean(last) * 1e3
    hand_first, hand_last = (statistics.mean(per_epoch[HAND][1:w + 1]) * 1e3,
                             statistics.mean(per_epoch[HAND][n - w:]) * 1e3)
    verdict = "met" if last_ms <= first_ms * 1.1 else "missed"
    command = f"python benchmarks/epoch_growth.py --epochs {n} --repeats {args.repeats}"
    lines = [f"# Extra time per epoch over a {n}-epoch run\n\n{datetime.date.today()}, {machine()}. `{command}`\n",
             "| epochs | hand loop (ms/epoch) | torchkiln extra (ms/epoch) | extra / hand epoch |",
             "|---|---:|---:|---:|",
             f"| 2-{w + 1} | {hand_first:.1f} | {first_ms:.1f} | {first_ms / hand_first:.1%} |",
             f"| {n - w + 1}-{n} | {hand_last:.1f} | {last_ms:.1f} | {last_ms / hand_last:.1%} |",
             "",
             f"Target (last {w} epochs' extra at most the first {w}'s + 10%): {verdict}"
             f" ({last_ms:.1f} ms against {first_ms:.1f} ms).",
             f"End of the run (last validation to return: plots, summary, last files): torchkiln"
             f" {statistics.median(ends[KILN]):.2f} s, hand loop {statistics.median(ends[HAND]):.2f} s."]
    if args.out:
        write_results(lines, args.out)
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
