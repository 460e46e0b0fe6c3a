"""Regression metrics kept in float64 whose multi-target convention follows scikit-learn."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class PerTargetRMSE(Metric):
    """RMSE of each target, averaged over targets: scikit-learn's `root_mean_squared_error`
    (multioutput='uniform_average'), not the RMSE over all elements. One target: the plain RMSE.

    `update(preds, target)`: (N,) or (N, T), with T = `num_targets`.
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_targets: int = 1, **kwargs):
        super().__init__(**kwargs)
        if int(num_targets) < 1:
            raise ValueError(f"num_targets: expected a positive integer; found {num_targets!r}")
        self.num_targets = int(num_targets)
        self.add_state("sum_squared_error", torch.zeros(self.num_targets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        rows = target.shape[0] if target.dim() else 1
        target = target.double().reshape(rows, -1)
        preds = preds.double().reshape(target.shape)
        if target.shape[1] != self.num_targets:
            raise ValueError(f"rmse: {target.shape[1]} targets per sample, built for {self.num_targets}"
                             " (set the task's `targets`)")
        self.sum_squared_error += (preds - target).square().sum(0)
        self.total += rows

    def compute(self) -> Tensor:
        return (self.sum_squared_error / self.total).sqrt().mean().float()
