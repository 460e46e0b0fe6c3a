"""Built-in callbacks: the monitor and early stopping, checkpointing, freezing, progress, logging,
and `kiln tune`'s per-epoch report to Ray Tune.

`callbacks: [{type, args}]` in a config adds callbacks by registered name or import path.
"""

from torchkiln.callbacks.monitor import EarlyStopping
from torchkiln.callbacks.tune_report import TuneReport
from torchkiln.registry import CALLBACKS

CALLBACKS.register(EarlyStopping)
CALLBACKS.register(TuneReport)

__all__ = ["EarlyStopping", "TuneReport"]
