"""`kiln train`'s set-up without the garbage collector's full passes.

Importing torch, scikit-learn and the rest makes Python run about six full collections before
the first training step (2026-12-02, digits: 0.7-0.9 s in all), each walking every object the
imports made and finding almost nothing to free (3 to 105 objects a pass). The CLI pauses the
collector while it sets up and resumes it when the loop starts (`Trainer.fit`, or the `--devices
N` launcher before it waits on its workers): one full pass frees the set-up's garbage (the
Trainer and model of a `batch_size: auto` search, a dev run's check: cycles only the collector
frees), then what is left is frozen (`gc.freeze`: modules, classes, the config; the collector's
later passes skip them, so those are quicker too), and the collector runs as usual from there
(`train --folds` is not paused: each fold's parts must be freed after it). Nothing changes for a
program that imports torchkiln: the pause is only taken by the CLI, and `resume` is a no-op
without it.
"""

from __future__ import annotations

import gc

_paused = False


def pause() -> None:
    """Stop the collector until `resume` (the CLI, at its start)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """Freeze what the set-up made and start the collector again, if `pause` stopped it."""
    global _paused
    if _paused:
        _paused = False
        gc.collect()  # the set-up's garbage first (a batch-size search's Trainer and model, ...):
        gc.freeze()  # what is frozen is never collected
        gc.enable()


def paused() -> bool:
    return _paused
