"""Top-k accuracy with a stated rule for tied scores.

torchmetrics ranks the classes with `torch.topk`, whose order among equal scores is unspecified
(and scikit-learn puts the higher class index first, so its top-1 differs from argmax). Here a
class tied with others ranks as argmax ranks it: the lower class index first. So `accuracy@1`
equals `accuracy`, and the result is the same on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchkiln.metrics.base import Metric


class TopKAccuracy(Metric):
    """The share of samples whose target is among the `top_k` highest scores (ties: lower index first).

    `update(preds, target)`: scores (N, C), target labels (N,); targets below 0 are left out.
    """

    higher_is_better = True

    def __init__(self, num_classes: int, top_k: int = 1):
        super().__init__()
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected a positive integer; found {top_k!r}")
        if top_k > num_classes:
            raise ValueError(f"top_k={top_k} is more than the {num_classes} classes")
        self.num_classes = int(num_classes)
        self.top_k = top_k
        self.add_state("hits", torch.zeros((), dtype=torch.long))
        self.add_state("total", torch.zeros((), dtype=torch.long))

    def update(self, preds: Tensor, target: Tensor) -> None:
        target = target.reshape(-1).long()
        if preds.dim() != 2 or preds.shape != (len(target), self.num_classes):
            raise ValueError(f"top-k accuracy needs scores ({len(target)}, {self.num_classes}); got {tuple(preds.shape)}")
        kept = target >= 0
        own = preds.gather(1, target.clamp(min=0)[:, None])
        classes = torch.arange(self.num_classes, device=preds.device)
        ahead = (preds > own) | ((preds == own) & (classes < target[:, None]))
        hit = ahead.sum(1) < self.top_k
        self.hits += (hit & kept).sum()
        self.total += kept.sum()

    def score(self) -> Tensor:
        return (self.hits.double() / self.total.clamp(min=1)).float()
