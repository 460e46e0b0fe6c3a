"""Fault injection for the checkpoint tests; imported by subprocesses as `kiln_faults:Name`.

Nothing here is part of torchkiln: the tests put this folder on PYTHONPATH and name these
classes in their configs (`model.type: kiln_faults:FaultyCNN`), the way a user plugs in code.

Environment variables (read once per process):
  KILN_FAULT_KILL_AT=N     SIGKILL this process at the N-th training forward pass
  KILN_FAULT_SLEEP=S       sleep S seconds in every training forward pass
  KILN_FAULT_READY=PATH    create PATH at the KILN_FAULT_READY_AT-th training forward (default 1)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from torchkiln.models.small import SmallCNN


class FaultyCNN(SmallCNN):
    """SmallCNN (same parameters, same random numbers drawn) that can die or dawdle on cue."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._calls = 0
        self._kill_at = int(os.environ.get("KILN_FAULT_KILL_AT", "0"))
        self._sleep = float(os.environ.get("KILN_FAULT_SLEEP", "0"))
        self._ready = os.environ.get("KILN_FAULT_READY")
        self._ready_at = int(os.environ.get("KILN_FAULT_READY_AT", "1"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._calls += 1
            if self._calls == self._kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if self._ready and self._calls == self._ready_at:
                Path(self._ready).touch()
            if self._sleep:
                time.sleep(self._sleep)
        return super().forward(x)


def _stall_on_save(n: int, ready: str) -> None:
    """Make the n-th checkpoint write (a torch.save, or the copy of a checkpoint just saved from
    the same state) write half its bytes, say so in `ready`, then hang (to be killed)."""
    import io
    import shutil

    real_save, real_copy = torch.save, shutil.copyfile
    calls = [0]

    def stall(data: bytes, f) -> None:
        f.write(data[: len(data) // 2])
        f.flush()
        Path(ready).write_text(getattr(getattr(f, "f", f), "name", ""))
        while True:
            time.sleep(1)

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] != n:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        stall(buf.getvalue(), f)

    def copyfile(src, dst, *args, **kwargs):
        calls[0] += 1
        if calls[0] != n:
            return real_copy(src, dst, *args, **kwargs)
        with open(dst, "wb") as f:
            stall(Path(src).read_bytes(), f)

    torch.save, shutil.copyfile = save, copyfile


if __name__ == "__main__":
    # `python -m kiln_faults ARGS` is `kiln ARGS`, with KILN_FAULT_STALL_SAVE=N and
    # KILN_FAULT_STALL_READY=PATH making the N-th checkpoint write hang halfway.
    import sys

    from torchkiln.cli import main

    if os.environ.get("KILN_FAULT_STALL_SAVE"):
        _stall_on_save(int(os.environ["KILN_FAULT_STALL_SAVE"]), os.environ["KILN_FAULT_STALL_READY"])
    sys.exit(main(sys.argv[1:]))
