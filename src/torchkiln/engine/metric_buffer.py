"""Metric updates gathered over a few batches: one metric update per group, not per batch.

A metric update costs tens of microseconds of Python whatever the batch size (a torchmetrics
collection ~80 us), which on small models is a few percent of a step. Tasks whose metric update is per sample (the
classification, multilabel and regression tasks: `concat_metric_updates = True`) get the same
epoch metrics from one update over k batches concatenated as from k updates, so their batches
are held here (detached; a few MB at most) and given to the metrics together.
"""

from __future__ import annotations

from typing import Any

import torch


class MetricBuffer:
    """Feeds `task.update_metrics(metrics, ...)`; `flush()` before reading or saving the metrics."""

    def __init__(self, task: Any, metrics: Any, batches: int = 64, max_elements: int = 1 << 20):
        self.task = task
        self.metrics = metrics
        self.batches = batches
        self.max_elements = max_elements
        self.concat = bool(getattr(task, "concat_metric_updates", False))
        self._outputs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._elements = 0

    def add(self, outputs: Any, targets: Any) -> None:
        if self.metrics is None:
            return
        if not (self.concat and self._fits(outputs, targets)):
            self.flush()
            with torch.no_grad():
                self.task.update_metrics(self.metrics, outputs, targets)
            return
        self._outputs.append(outputs.detach())
        self._targets.append(targets.detach())
        self._elements += outputs.numel()
        if len(self._outputs) >= self.batches or self._elements >= self.max_elements:
            self.flush()

    def _fits(self, outputs: Any, targets: Any) -> bool:
        """Plain tensors that concatenate with what is held (else what is held goes first)."""
        if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
            return False
        if outputs.dim() == 0 or targets.dim() == 0 or outputs.numel() > self.max_elements:
            return False
        if self._outputs:
            o, t = self._outputs[0], self._targets[0]
            if (o.shape[1:], o.dtype, o.device, t.shape[1:], t.dtype) != (
                outputs.shape[1:], outputs.dtype, outputs.device, targets.shape[1:], targets.dtype
            ):
                self.flush()
        return True

    def flush(self) -> None:
        if not self._outputs:
            return
        outputs, targets = self._outputs, self._targets
        self._outputs, self._targets, self._elements = [], [], 0
        with torch.no_grad():
            self.task.update_metrics(
                self.metrics,
                torch.cat(outputs) if len(outputs) > 1 else outputs[0],
                torch.cat(targets) if len(targets) > 1 else targets[0],
            )
