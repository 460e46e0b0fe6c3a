"""Start-up: the seconds from `kiln train` (the default digits config) to the end of its first
training step, against a hand-written script doing the same set-up (torch, the digits from
scikit-learn, a stratified split, the same small CNN, AdamW, OneCycleLR, a DataLoader, one step).

`kiln train` pauses the garbage collector through its set-up (torchkiln/gcpause.py: about six
full passes over the imports' objects that free nearly nothing); the hand script is also run with
the collector paused the same way, so that kiln's own set-up cost shows apart from that gain.

Also times, each in a fresh interpreter, `import torch` + scikit-learn (what the hand script
imports) and `import torchmetrics` on top (it imports torchvision, scipy.signal and matplotlib
itself): what `kiln train` paid when its metrics were torchmetrics Metrics, and saves now that the
default ones are torchkiln's own (metrics/base.py). Medians of `--repeats` interleaved rounds.

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))

HAND = r'''
import os, time
import torch
from torch import nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
torch.manual_seed(42)
d = load_digits()
x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
y = torch.as_tensor(d.target)
tr, _ = train_test_split(range(len(y)), test_size=0.3, stratify=d.target, random_state=42)
ds = torch.utils.data.TensorDataset(x[tr], y[tr])
loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)
w = 32
model = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, 2 * w, 3, padding=1),
                      nn.BatchNorm2d(2 * w), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1),
                      nn.Linear(2 * w, 10))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10 * len(loader))
loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
for xb, yb in loader:
    loss = loss_fn(model(xb), yb)
    opt.zero_grad(); loss.backward(); nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
    break
open(os.environ["KILN_FIRST_STEP_FILE"], "w").write(repr(time.time()))
'''

# The same script with the collector paused through its set-up as `kiln train` pauses it
# (torchkiln/gcpause.py): kiln's own cost, the collector's passes left out of both.
HAND_GC = ("import gc\ngc.disable()\n" + HAND).replace(
    "for xb, yb in loader:", "gc.collect(); gc.freeze(); gc.enable()\nfor xb, yb in loader:")
assert HAND_GC.count("gc.freeze()") == 1

BASE = "import torch, sklearn (what the hand script imports)"
GC_ROW = "hand-written script, the collector paused through its set-up as kiln pauses it"
TM = "  + import torchmetrics (with the torchvision, scipy.signal, matplotlib it imports; not imported by kiln train)"

CONFIG = """name: startup
output_dir: {out}
callbacks: [{{type: "startup_probe:FirstStep"}}]
logging: {{progress: false}}
"""


def to_first_step(cmd: list[str], env: dict, marker: Path) -> float:
    marker.unlink(missing_ok=True)
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return float(marker.read_text()) - t0


def import_seconds(code: str, env: dict, marker: Path) -> float:
    """Process start -> the imports done (marked as the runs mark their first step: Python's own
    teardown of the modules at exit, ~2 s with torch loaded, is not counted)."""
    mark = "; import os, time; open(os.environ['KILN_FIRST_STEP_FILE'], 'w').write(repr(time.time()))"
    return to_first_step([sys.executable, "-c", code + mark], env, marker)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-startup-"))
    marker = tmp / "first_step"
    cfg = tmp / "startup.yaml"
    cfg.write_text(CONFIG.format(out=tmp / "runs"))
    hand, hand_gc = tmp / "hand.py", tmp / "hand_gc.py"
    hand.write_text(HAND)
    hand_gc.write_text(HAND_GC)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)]), "KILN_FIRST_STEP_FILE": str(marker)}
    base = "import torch, sklearn.model_selection, sklearn.datasets"
    runs = {
        "hand-written script": [sys.executable, str(hand)],
        "kiln train (default digits config)": [sys.executable, "-m", "torchkiln", "train", "-c", str(cfg), "-q"],
        GC_ROW: [sys.executable, str(hand_gc)],
    }
    imports = {BASE: base, TM: base + "; import torchmetrics"}
    times: dict[str, list[float]] = {k: [] for k in [*runs, *imports]}
    for _ in range(args.repeats):
        for name, cmd in runs.items():
            times[name].append(to_first_step(cmd, env, marker))
        for name, code in imports.items():
            times[name].append(import_seconds(code, env, marker))
    med = {k: statistics.median(v) for k, v in times.items()}
    hand_s = med["hand-written script"]
    rows = [f"| {k} | {med[k]:.2f} | {min(v):.2f}-{max(v):.2f} |" for k, v in times.items()]
    kiln_s = med["kiln train (default digits config)"]
    tm = med[TM] - med[BASE]
    text = (f"# Start-up\n\n{datetime.date.today()}, `python benchmarks/startup.py --repeats {args.repeats}`"
            f" ({os.cpu_count()} cores)\n\n| process start -> end of the first training step | seconds (median) |"
            " (min-max) |\n|---|---:|---:|\n" + "\n".join(rows) +
            f"\n\nkiln train - hand script: **{kiln_s - hand_s:+.2f} s** (target: at most +0.5 s); against"
            f" the hand script with the collector paused the same way: {kiln_s - med[GC_ROW]:+.2f} s (kiln's own"
            f" set-up, the collector's full passes, {hand_s - med[GC_ROW]:.2f} s of the hand script's, left out);"
            f" the torchmetrics import that the default metrics no longer make would add {tm:+.2f} s.\n")
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
