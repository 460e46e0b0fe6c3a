"""Built-in callbacks: the monitor and early stopping, checkpointing, freezing, progress, logging,
and `kiln tune`'s per-epoch report to Ray Tune.

`callbacks: [{type, args}]` in a config adds callbacks by registered name or import path.
"""

from torchkiln.callbacks.ema import EMA
from torchkiln.callbacks.monitor import EarlyStopping
from torchkiln.callbacks.swa import SWA
from torchkiln.callbacks.training_checks import TrainingChecks
from torchkiln.callbacks.tune_report import TuneReport
from torchkiln.registry import CALLBACKS

for _cb in (EarlyStopping, EMA, SWA, TrainingChecks, TuneReport):
    CALLBACKS.register(_cb)

__all__ = ["EMA", "SWA", "EarlyStopping", "TrainingChecks", "TuneReport"]
