"""ROC-AUC and average precision averaged over the classes (labels) where they are defined.

A class with no positive target has no ROC curve and no precision-recall curve; one with no
negative target has no ROC curve. torchmetrics' macro AUROC counts such a class as 0 (and its
multi-label AP does too), so one class absent from a validation epoch pulls the average down;
scikit-learn refuses (ROC-AUC) or scores 0 with a warning (AP). Here the macro average is over
the classes where the score is defined; 0 when there is none.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics.classification import (
    MulticlassAUROC,
    MulticlassAveragePrecision,
    MultilabelAUROC,
    MultilabelAveragePrecision,
)
from torchmetrics.utilities import dim_zero_cat


def _defined_mean(per_class: Tensor, positives: Tensor, negatives: Tensor, need_negatives: bool) -> Tensor:
    defined = (positives > 0) & ((negatives > 0) if need_negatives else True)
    if not bool(defined.any()):
        return torch.zeros((), device=per_class.device)
    return per_class[defined].double().mean().float()


def _per_class(metric, cls) -> Tensor:
    """torchmetrics' per-class scores, without its warnings about the classes left out here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"No (positive|negative) samples")
        return super(cls, metric).compute()


def _multiclass_counts(metric, num_classes: int) -> tuple[Tensor, Tensor]:
    target = dim_zero_cat(metric.target).long()
    if metric.ignore_index is not None:
        target = target[target != metric.ignore_index]
    positives = torch.bincount(target, minlength=num_classes)[:num_classes]
    return positives, len(target) - positives


def _multilabel_counts(metric) -> tuple[Tensor, Tensor]:
    target = dim_zero_cat(metric.target).long()
    if target.dim() == 3:  # (N, L, ...): labels on dim 1
        target = target.movedim(1, -1).reshape(-1, target.shape[1])
    kept = target != metric.ignore_index if metric.ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    positives = ((target == 1) & kept).sum(0)
    return positives, ((target == 0) & kept).sum(0)


class MacroAUROC(MulticlassAUROC):
    """One-vs-rest ROC-AUC, the mean over the classes with positive and negative targets."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(num_classes=num_classes, average="none", thresholds=None, **kwargs)

    def compute(self) -> Tensor:
        return _defined_mean(_per_class(self, MacroAUROC), *_multiclass_counts(self, self.num_classes), need_negatives=True)


class MacroAveragePrecision(MulticlassAveragePrecision):
    """One-vs-rest average precision, the mean over the classes with positive targets."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(num_classes=num_classes, average="none", thresholds=None, **kwargs)

    def compute(self) -> Tensor:
        return _defined_mean(_per_class(self, MacroAveragePrecision), *_multiclass_counts(self, self.num_classes),
                             need_negatives=False)


class MultilabelMacroAUROC(MultilabelAUROC):
    """ROC-AUC per label, the mean over the labels with positive and negative targets."""

    def __init__(self, num_labels: int, **kwargs):
        super().__init__(num_labels=num_labels, average="none", thresholds=None, **kwargs)

    def compute(self) -> Tensor:
        return _defined_mean(_per_class(self, MultilabelMacroAUROC), *_multilabel_counts(self), need_negatives=True)


class MultilabelMacroAveragePrecision(MultilabelAveragePrecision):
    """Average precision per label, the mean over the labels with positive targets."""

    def __init__(self, num_labels: int, **kwargs):
        super().__init__(num_labels=num_labels, average="none", thresholds=None, **kwargs)

    def compute(self) -> Tensor:
        return _defined_mean(_per_class(self, MultilabelMacroAveragePrecision), *_multilabel_counts(self),
                             need_negatives=False)
