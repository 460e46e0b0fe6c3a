"""torchkiln: a PyTorch training toolkit, config-driven or code-first."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchkiln.version import __version__

# Heavy objects (anything importing torch) load on first use so that `kiln --help` stays fast.
_LAZY = {
    "Trainer": "torchkiln.engine.trainer",
    "make_trainer": "torchkiln.engine.settings",
    "Callback": "torchkiln.engine.callbacks",
    "seed_everything": "torchkiln.seeding",
    "fingerprint": "torchkiln.seeding",
    "run_loggers": "torchkiln.loggers",
    "load": "torchkiln.inference",
}

if TYPE_CHECKING:  # pragma: no cover
    from torchkiln.engine.callbacks import Callback
    from torchkiln.engine.settings import make_trainer
    from torchkiln.engine.trainer import Trainer
    from torchkiln.inference import load
    from torchkiln.loggers import run_loggers
    from torchkiln.seeding import fingerprint, seed_everything


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'torchkiln' has no attribute {name!r}")


__all__ = ["Callback", "Trainer", "make_trainer", "run_loggers", "seed_everything", "fingerprint", "load",
           "__version__"]
