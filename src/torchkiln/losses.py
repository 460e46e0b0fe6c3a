"""Losses by name: every torch.nn loss, plus our own, and weighted sums of several."""

from __future__ import annotations

import torch
from torch import nn


class WeightedSum(nn.Module):
    """sum_i weight_i * loss_i(outputs, targets)."""

    def __init__(self, losses: list[nn.Module], weights: list[float]):
        super().__init__()
        self.losses = nn.ModuleList(losses)
        self.weights = list(weights)

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = outputs.new_zeros(())
        for w, loss in zip(self.weights, self.losses):
            total = total + w * loss(outputs, targets)
        return total
