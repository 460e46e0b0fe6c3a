"""Checkpoint save and load at about 10M, 100M and 300M parameters with AdamW (after one step).

For each size: torch.save + fsync + rename written by hand (the ratios' base: the atomic save
torchkiln makes), torch.save + fsync to a new file and over the same file, torchkiln's save_checkpoint (temp file, fsync, rename, the
archive's CRC-32 per record), torch.distributed.checkpoint (single process, for reference); then
torch.load(weights_only=True), torchkiln's load_checkpoint (weights_only, every record's CRC-32
checked) and DCP's load into the live state. Seconds are the median of `--repeats` interleaved
rounds (each round loads 3 times, interleaved); memory is the peak resident memory during the call above what the process held when the
call began (save) or holds once it returned (load: the loaded state itself is not counted),
read from /proc/self/status (VmHWM, reset before each call).

    python benchmarks/checkpoint_scale.py [--sizes 10,100,300] [--repeats 3,3,1] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from torchkiln.engine.checkpoint import FORMAT, load_checkpoint, save_checkpoint  # noqa: E402

SAVE_BASE = "torch.save + fsync + rename (atomic, by hand)"  # the ratios' base: what torchkiln's save does
LOAD_BASE = "torch.load(weights_only=True)"
LOADS_PER_ROUND = 3
WIDTH = 2048  # Linear(2048, 2048) layers: 4.2M parameters each


def rss() -> int:
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def build_state(millions: int) -> tuple[dict, torch.nn.Module, torch.optim.Optimizer]:
    layers = max(1, round(millions * 1e6 / (WIDTH * WIDTH + WIDTH)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = {"format": FORMAT, "version": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "loop": {"epoch": 1, "history": [{"epoch": 1, "train/loss": 0.5}]}}
    return state, model, optimizer


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def timed(fn, keep_result: bool = False) -> tuple[float, int]:
    gc.collect()
    before = rss()
    reset_peak()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    base = rss() if keep_result else before
    del out
    gc.collect()
    return seconds, max(0, peak - base)


def run_size(millions: int, repeats: int, root: Path) -> list[dict]:
    import torch.distributed.checkpoint as dcp

    state, model, optimizer = build_state(millions)
    params = sum(p.numel() for p in model.parameters())
    plain, fresh, atomic, ours = root / "plain.pt", root / "fresh.pt", root / "atomic.pt", root / "ours.ckpt"
    dcp_dir = root / "dcp"

    def torch_save():
        torch.save(state, plain)
        fsync_file(plain)

    def torch_save_new():  # a new file (the old one unlinked first)
        fresh.unlink(missing_ok=True)
        torch.save(state, fresh)
        fsync_file(fresh)

    def torch_save_atomic():  # what an atomic save does, by hand: a temp file, fsync, rename over the old one
        tmp = atomic.with_suffix(".tmp")
        torch.save(state, tmp)
        fsync_file(tmp)
        os.replace(tmp, atomic)

    def dcp_save():
        shutil.rmtree(dcp_dir, ignore_errors=True)
        dcp.save({"model": state["model"], "optimizer": state["optimizer"]}, checkpoint_id=str(dcp_dir))

    def dcp_load():
        target = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        dcp.load(target, checkpoint_id=str(dcp_dir))

    saves = {SAVE_BASE: torch_save_atomic, "torch.save + fsync, to a new file (the old one unlinked first)": torch_save_new,
             "torch.save + fsync, over the same file": torch_save,
             "torchkiln save_checkpoint": lambda: save_checkpoint(state, ours),
             "torch.distributed.checkpoint save": dcp_save}
    loads = {LOAD_BASE: lambda: torch.load(plain, weights_only=True),
             "torchkiln load_checkpoint": lambda: load_checkpoint(ours),
             "torch.distributed.checkpoint load (in place)": dcp_load}
    times: dict[str, list[tuple[float, int]]] = {k: [] for k in [*saves, *loads]}
    for _ in range(repeats):
        for name, fn in saves.items():
            times[name].append(timed(fn))
        for _ in range(LOADS_PER_ROUND):  # loads are quick and scatter with the page cache: more samples
            for name, fn in loads.items():
                times[name].append(timed(fn, keep_result=True))
    size = ours.stat().st_size
    rows = []
    for name, samples in times.items():
        secs = [s for s, _ in samples]
        rows.append({"size": f"{params / 1e6:.0f}M", "ckpt_gb": size / 1e9, "what": name,
                     "seconds": statistics.median(secs), "min": min(secs), "max": max(secs),
                     "extra_gb": max(m for _, m in samples) / 1e9})
    for p in (plain, fresh, atomic, ours):
        p.unlink(missing_ok=True)
    shutil.rmtree(dcp_dir, ignore_errors=True)
    gc.collect()
    return rows


def table(rows: list[dict]) -> str:
    base = {}
    for r in rows:
        if r["what"] in (SAVE_BASE, LOAD_BASE):
            base[(r["size"], r["what"].startswith("torch.save"))] = r["seconds"]
    out = ["| params | checkpoint (GB) | what | seconds (median) | (min-max) | x torch | extra peak memory (GB) | extra / checkpoint |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        is_save = "save" in r["what"]
        ratio = r["seconds"] / base[(r["size"], is_save)]
        out.append(f"| {r['size']} | {r['ckpt_gb']:.2f} | {r['what']} | {r['seconds']:.2f} | "
                   f"{r['min']:.2f}-{r['max']:.2f} | {ratio:.2f}x | {r['extra_gb']:.2f} | "
                   f"{r['extra_gb'] / r['ckpt_gb']:.0%} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,300", help="millions of parameters")
    ap.add_argument("--repeats", default="3,3,1", help="rounds per size")
    ap.add_argument("--dir", default=None, help="where the files go (default: a temp folder)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*torch.distributed.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
    sizes = [int(s) for s in args.sizes.split(",")]
    repeats = [int(r) for r in args.repeats.split(",")] + [1] * len(sizes)
    root = Path(tempfile.mkdtemp(prefix="kiln-ckpt-", dir=args.dir))
    rows = []
    try:
        for millions, n in zip(sizes, repeats):
            rows += run_size(millions, n, root)
            print(table(rows), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = (f"# Checkpoint save/load at scale\n\n{datetime.date.today()}, {machine()}, torch {torch.__version__}."
            f" `python benchmarks/checkpoint_scale.py --sizes {args.sizes} --repeats {args.repeats}`\n\n"
            + table(rows) + "\n")
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
