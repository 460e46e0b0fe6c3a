"""An epoch's sums: the loss over every sample and the metric states, exact over samples (not a
mean of batch means), summed over ranks at the end, and saved whole in a mid-epoch checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchkiln.engine import distributed
from torchkiln.engine.metric_buffer import MetricBuffer
from torchkiln.metrics.base import MetricSet, as_metric_set


class EpochTotals:
    def __init__(self, task: Any, metrics: Any, device: torch.device):
        self.task, self.metrics, self.device = task, metrics, device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.count = 0
        self.buffer = MetricBuffer(self.task, self.metrics)
        if self.metrics is not None:
            self.metrics.reset()

    def add(self, loss: torch.Tensor, n: int, outputs: Any, targets: Any) -> None:
        self.loss_sum += loss.detach().float() * n
        self.count += n
        self.buffer.add(outputs, targets)

    def state_dict(self) -> dict[str, Any]:
        """The partial sums, for a checkpoint taken mid-epoch."""
        self.buffer.flush()
        return {"loss_sum": self.loss_sum.detach().cpu(), "count": self.count,
                "metrics": self.metrics.state_dict() if self.metrics is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.loss_sum, self.count = state["loss_sum"].to(self.device), int(state["count"])
        if self.metrics is not None and state.get("metrics") is not None:
            self.metrics.load_state_dict(state["metrics"])

    def result(self, prefix: str) -> dict[str, float]:
        """`<prefix>/loss` and `<prefix>/<metric>` over every rank's samples; the sums start again."""
        self.buffer.flush()
        loss_sum, count = distributed.sum_over_ranks(self.loss_sum, self.count)
        record = {f"{prefix}/loss": float(loss_sum / count)} if count else {}
        if self.metrics is not None and count:
            computed = scalars(self.metrics.compute())
            record.update({f"{prefix}/{k.split('/', 1)[1]}": v for k, v in computed.items()})
        self.reset()
        return record


def scalars(computed: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Scalars as they are; vectors (per-class metrics) as `name/<i>`; matrices are left to reports."""
    out: dict[str, float] = {}
    for k, v in computed.items():
        if not isinstance(v, torch.Tensor):
            continue
        if v.numel() == 1:
            out[k] = float(v)
        elif v.dim() == 1:
            out.update({f"{k}/{i}": x for i, x in enumerate(v.tolist())})
    return out


def clone_metrics(metrics: Any, prefix: str) -> MetricSet | None:
    """The Trainer's own copy of `metrics` (a MetricSet, a mapping or list of metrics), keyed `prefix/`."""
    return None if metrics is None else as_metric_set(metrics).clone(prefix=prefix)
