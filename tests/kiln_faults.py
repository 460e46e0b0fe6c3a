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

from torchkiln.engine.callbacks import Callback
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
    """Make the n-th checkpoint write (a new file's bytes, or the second name given to a file
    just written from the same state) stall halfway, say so in `ready`, then hang (to be killed):
    a new file gets half its bytes, a second name is made but never renamed into place."""
    from torchkiln.engine import checkpoint

    real_write, real_link = checkpoint._write_file, checkpoint._link_or_copy
    calls = [0]

    def hang(path) -> None:
        Path(ready).write_text(str(path))
        while True:
            time.sleep(1)

    def write_file(path, state) -> None:
        calls[0] += 1
        if calls[0] != n:
            return real_write(path, state)
        with open(path, "xb") as f:  # the stream stops halfway through the archive
            torch.save(state, _HalfWriter(f, len(_serialized(state)) // 2, lambda: hang(path)))

    def link_or_copy(source, path) -> None:
        calls[0] += 1
        real_link(source, path)
        if calls[0] == n:
            hang(path)

    checkpoint._write_file, checkpoint._link_or_copy = write_file, link_or_copy


class _HalfWriter:
    """A file that takes the first `limit` bytes written to it, then stops the writer where it is."""

    def __init__(self, f, limit: int, stop):
        self.f, self.left, self.stop = f, limit, stop

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self.f.write(data[: self.left])
        self.left -= min(self.left, len(data))
        if not self.left:
            self.f.flush()
            self.stop()
        return len(data)

    def flush(self) -> None:
        self.f.flush()


def _serialized(state) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


if __name__ == "__main__":
    # `python -m kiln_faults ARGS` is `kiln ARGS`, with KILN_FAULT_STALL_SAVE=N and
    # KILN_FAULT_STALL_READY=PATH making the N-th checkpoint write hang halfway.
    import sys

    from torchkiln.cli import main

    if os.environ.get("KILN_FAULT_STALL_SAVE"):
        _stall_on_save(int(os.environ["KILN_FAULT_STALL_SAVE"]), os.environ["KILN_FAULT_STALL_READY"])
    sys.exit(main(sys.argv[1:]))


class StepCountingLR(Callback):
    """A user callback with state: it counts optimizer steps itself and, every `every` of them,
    multiplies the learning rate by `factor`. Resumed without its count, it would halve at other steps."""

    def __init__(self, every: int = 7, factor: float = 0.5):
        self.every, self.factor, self.steps = every, factor, 0

    def on_step_end(self, trainer, info) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            for group in trainer.optimizer.param_groups:
                group["lr"] *= self.factor

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


class UnusedParamMLP(torch.nn.Module):
    """An MLP with a layer its forward never calls: the first-epoch checks must name it."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                        torch.nn.Linear(32, num_classes))
        self.spare = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
