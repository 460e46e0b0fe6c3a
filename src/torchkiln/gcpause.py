"""`kiln train`'s set-up without the garbage collector's full passes.

Importing torch, scikit-learn and the rest makes Python run about six full collections before the
first training step (2026-12-02, digits: 0.7 s in all), each walking every object the imports made
and finding almost nothing to free (3 to 105 objects a pass). The CLI pauses the collector while
it sets up and resumes it when the loop starts (`Trainer.fit`, or the `--devices N` launcher
before it waits on its workers): the objects made so far are frozen (`gc.freeze`: modules,
classes, the config; the collector's later passes skip them, so those are quicker too), and the
collector runs as usual from there. Nothing changes for a program that imports torchkiln: the
pause is only taken by the CLI, and `resume` is a no-op without it.
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
        gc.freeze()
        gc.enable()


def paused() -> bool:
    return _paused
