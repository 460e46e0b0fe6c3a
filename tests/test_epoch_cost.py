"""Per-epoch cost does not grow with the epochs (DESIGN.md's cost contract), counted, not timed.

A 50-epoch `kiln train` run (in process, through commands/train.py with its defaults: history,
metrics.csv/jsonl, TensorBoard, best.ckpt and last.ckpt every epoch) on a small TensorFile. A
user callback counts the Python and C function calls of each epoch (training, validation, the
epoch's logging and checkpoints); the late epochs may not make more calls than the early ones.
Work that is O(epochs) per epoch (a history copied value by value, a file rewritten whole) shows
as a count that grows. The time it costs is `benchmarks/epoch_growth.py`'s.
"""

from __future__ import annotations

import sys

import torch

from conftest import small_config
from torchkiln.commands.train import train
from torchkiln.config.load import resolve

COUNTER = '''
import sys

from torchkiln.engine.callbacks import Callback

PER_EPOCH = []


class CallCounter(Callback):
    """Counts every function call of the main thread from the fit's start; the count at each epoch's end."""

    def on_fit_start(self, trainer):
        self.calls = 0

        def count(frame, event, arg):
            if event in ("call", "c_call"):
                self.calls += 1

        sys.setprofile(count)

    def on_epoch_end(self, trainer, epoch, record):
        PER_EPOCH.append(self.calls)

    def on_fit_end(self, trainer, summary):
        sys.setprofile(None)
'''

EPOCHS, WINDOW = 50, 10


def test_the_calls_of_an_epoch_do_not_grow_with_the_epochs(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    torch.save({"x": x, "y": (x[:, 0] > 0).long() + (x[:, 1] > 0).long()}, tmp_path / "small.pt")
    (tmp_path / "growthcount.py").write_text(COUNTER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("growthcount", None)
    cfg = small_config(
        tmp_path,
        data={"dataset": {"type": "TensorFile", "args": {"path": str(tmp_path / "small.pt")}},
              "val_split": 0.25, "test_split": 0.0, "batch_size": 32},
        model={"type": "MLP", "args": {"in_features": 8, "num_classes": 3, "hidden": [16]}},
        trainer={"epochs": EPOCHS, "monitor": "val/accuracy"},
        logging={"progress": False, "images_every": 1000},  # validation pictures at the first and last epoch only
        callbacks=[{"type": "growthcount:CallCounter"}],
    )
    run_dir, summary = train(resolve(cfg), progress=False)
    assert summary["epochs_completed"] == EPOCHS and (run_dir / "checkpoints" / "last.ckpt").is_file()
    import growthcount

    ends = growthcount.PER_EPOCH
    per_epoch = [b - a for a, b in zip(ends, ends[1:])]  # epoch e's end -> epoch e+1's end
    first = per_epoch[1:1 + WINDOW]  # the epochs after the second (one-time costs are done by then)
    last = per_epoch[-WINDOW - 1:-1]  # before the last one (its pictures and final files)
    early, late = sum(first) / WINDOW, sum(last) / WINDOW
    assert early > 1000, per_epoch  # the counter saw the epochs' work
    assert late <= early * 1.03, f"calls per epoch grew from {early:.0f} to {late:.0f}: {per_epoch}"
