"""A task turns a batch into (outputs, targets), a loss, and metric updates. Subclass for your own."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchkiln.registry import TASKS


class Task:
    """Supervised default: a batch is (inputs, targets); outputs = model(inputs)."""

    name = "task"
    default_loss = "MSELoss"
    default_metrics: tuple[str, ...] = ()

    def split_batch(self, batch: Any) -> tuple[Any, Any]:
        if isinstance(batch, dict):
            return batch["input"], batch.get("target")
        inputs, targets = batch[0], batch[1] if len(batch) > 1 else None
        return inputs, targets

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs, targets = self.split_batch(batch)
        return model(inputs), targets

    def loss(self, loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(outputs, targets)

    def update_metrics(self, metrics: Any, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        metrics.update(outputs.detach().float(), targets)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def batch_size(self, batch: Any) -> int:
        inputs, _ = self.split_batch(batch)
        while isinstance(inputs, (list, tuple, dict)):
            inputs = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
        return int(inputs.shape[0])

    def monitor_mode(self, monitor: str) -> str:
        low = monitor.rsplit("/", 1)[-1]
        return "min" if "loss" in low or low in {"mae", "mse", "rmse"} else "max"


@TASKS.register(name="classification")
class ClassificationTask(Task):
    """Single-label classification over C classes; outputs are logits (N, C)."""

    name = "classification"
    default_loss = "CrossEntropyLoss"
    default_metrics = ("accuracy",)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(dim=1)


@TASKS.register(name="regression")
class RegressionTask(Task):
    """One or more real targets; outputs are (N,) or (N, T)."""

    name = "regression"
    default_loss = "MSELoss"
    default_metrics = ("mae",)

    def loss(self, loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(outputs.reshape(targets.shape).float(), targets.float())

    def update_metrics(self, metrics: Any, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        metrics.update(outputs.detach().float().reshape(targets.shape), targets.float())
