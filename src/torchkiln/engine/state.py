"""The loop's position and decisions, as plain data that goes into every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken (skipped fp16 steps included)
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch
    best: float | None = None
    best_epoch: int | None = None
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every number of the history, a cost per checkpoint
        # that grows with the epochs (the rows hold floats and strings only). The rows are copied
        # in C (map), without a Python call per row.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["history"] = list(map(dict, self.history))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class StopRequested(Exception):
    """A signal asked the run to stop; a checkpoint was written before this was raised."""

    def __init__(self, signum: int, checkpoint: str | None):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
        self.checkpoint = checkpoint
