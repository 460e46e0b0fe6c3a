"""Built-in callbacks: the monitor and early stopping, checkpointing, freezing, progress, logging.

`callbacks: [{type, args}]` in a config adds callbacks by registered name or import path.
"""

from torchkiln.callbacks.monitor import EarlyStopping
from torchkiln.registry import CALLBACKS

CALLBACKS.register(EarlyStopping)

__all__ = ["EarlyStopping"]
