"""Tasks: how a batch becomes a loss, predictions and metric updates."""

from torchkiln.tasks.base import ClassificationTask, RegressionTask, Task

__all__ = ["Task", "ClassificationTask", "RegressionTask"]
