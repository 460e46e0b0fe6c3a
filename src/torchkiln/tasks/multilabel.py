"""Multi-label classification: L independent yes/no labels, sigmoid and a threshold."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchkiln.registry import TASKS
from torchkiln.tasks.base import ReportView, Task


@TASKS.register(name="multilabel")
class MultiLabelTask(Task):
    """Outputs are logits (N, L); targets are 0/1 (N, L). A label is predicted when sigmoid >= threshold."""

    name = "multilabel"
    default_loss = "BCEWithLogitsLoss"
    default_metrics = ("f1_macro", "exact_match", "accuracy")
    metric_kind = "multilabel"
    concat_metric_updates = True

    def __init__(self, threshold: float = 0.5):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1; found {threshold}")
        self.threshold = float(threshold)

    def loss(self, loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(outputs, targets.to(outputs.dtype))

    def update_metrics(self, metrics: Any, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        # Metrics with a threshold get this task's 0/1 predictions (torchmetrics' own rule is
        # prob > threshold, which differs at the threshold itself); AUROC / AP the probabilities.
        probs = outputs.detach().float().sigmoid()
        labels = (probs >= self.threshold).long()
        targets = targets.long()
        for metric in metrics.values() if hasattr(metrics, "values") else [metrics]:
            metric.update(labels if hasattr(metric, "threshold") else probs, targets)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return (outputs.float().sigmoid() >= self.threshold).long()

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().sigmoid()

    def outputs_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.logit(scores, eps=1e-7)  # sigmoid(logit p) = p

    def prediction_writer(self, options: Any) -> Any:
        from torchkiln.tasks.predictions import MultiLabelWriter

        return MultiLabelWriter(options, options.num_classes, self.threshold)

    def report_views(self, outputs: torch.Tensor, targets: torch.Tensor,
                     class_names: list[str] | None = None) -> list[ReportView]:
        return [ReportView("", "multilabel", self.predict(outputs), targets.long(), int(outputs.shape[1]),
                           class_names)]
