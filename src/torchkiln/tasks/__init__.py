"""Tasks: how a batch becomes a loss, predictions and metric updates."""

from torchkiln.tasks.base import ClassificationTask, RegressionTask, ReportView, Task
from torchkiln.tasks.build import build_task
from torchkiln.tasks.multihead import MultiHeadLoss, MultiHeadTask
from torchkiln.tasks.multilabel import MultiLabelTask
from torchkiln.tasks.ranking import RankingTask

__all__ = [
    "Task", "ClassificationTask", "RegressionTask", "MultiLabelTask", "RankingTask", "MultiHeadTask",
    "MultiHeadLoss", "ReportView", "build_task",
]
