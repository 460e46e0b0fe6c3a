"""Losses by name: every torch.nn loss, plus our own, and weighted sums of several.

Tensor arguments (`weight`, `pos_weight`, `alpha`) may be lists in the config, or `balanced`:
computed from the training labels like scikit-learn's `compute_class_weight('balanced')`,
n / (C * count_c), and for `pos_weight` (multi-label) negatives / positives per label.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchkiln.errors import ConfigError
from torchkiln.registry import LOSSES, construct

TENSOR_ARGS = ("weight", "pos_weight", "alpha")


def _softmax_or_sigmoid(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(probabilities, one-hot/multi-hot targets, multilabel?) for (N, C) logits."""
    if targets.shape == logits.shape and targets.dtype.is_floating_point:
        return logits.sigmoid(), targets.to(logits.dtype), True
    onehot = F.one_hot(targets.long(), logits.shape[1]).to(logits.dtype)
    return logits.softmax(dim=1), onehot, False


@LOSSES.register
class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): -alpha_t (1 - p_t)^gamma log p_t.

    Single-label (targets are class indices): softmax over classes; `alpha` a scalar multiplies
    every term, a per-class list weights each sample by its class and the mean is normalised by the
    sum of those weights, exactly like CrossEntropyLoss(weight=...), so gamma=0 gives cross-entropy.
    Multi-label (float targets shaped like the logits): sigmoid per label; alpha weighs positives
    and 1 - alpha negatives (torchvision's sigmoid_focal_loss), averaged over all entries.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | list[float] | torch.Tensor | None = None,
                 reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean, sum or none; found {reduction!r}")
        self.gamma = float(gamma)
        self.reduction = reduction
        if alpha is None or isinstance(alpha, (int, float)):
            self.scalar_alpha = None if alpha is None else float(alpha)
            self.register_buffer("alpha", None)
        else:
            self.scalar_alpha = None
            self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.shape == logits.shape and targets.dtype.is_floating_point:
            return self._sigmoid(logits, targets.to(logits.dtype))
        logp = F.log_softmax(_wide(logits), dim=1).gather(1, targets.long().unsqueeze(1)).squeeze(1)
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.scalar_alpha is not None:
            loss = self.scalar_alpha * loss
        if self.alpha is not None:
            w = self.alpha.to(loss.dtype)[targets.long()]
            loss = w * loss
            if self.reduction == "mean":
                return loss.sum() / w.sum()
        return _reduce(loss, self.reduction)

    def _sigmoid(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = _wide(logits).sigmoid()
        ce = F.binary_cross_entropy_with_logits(_wide(logits), targets.to(p.dtype), reduction="none")
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = ce * (1 - p_t) ** self.gamma
        alpha = self.scalar_alpha if self.alpha is None else self.alpha.to(loss.dtype)
        if alpha is not None:
            loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
        return _reduce(loss, self.reduction)


@LOSSES.register
class LabelSmoothingLoss(nn.Module):
    """(1 - eps) * NLL + eps * mean over classes of -log p: equals CrossEntropyLoss(label_smoothing=eps)."""

    def __init__(self, smoothing: float = 0.1, reduction: str = "mean"):
        super().__init__()
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must be in [0, 1]; found {smoothing}")
        self.smoothing = float(smoothing)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(_wide(logits), dim=1)
        nll = -logp.gather(1, targets.long().unsqueeze(1)).squeeze(1)
        smooth = -logp.mean(dim=1)
        return _reduce((1 - self.smoothing) * nll + self.smoothing * smooth, self.reduction)


@LOSSES.register
class F1Loss(nn.Module):
    """1 - soft macro F1: F1 per class from probabilities (tp = sum p*y, ...), averaged over classes.

    Softmax for class-index targets, sigmoid for multi-label float targets. `eps` keeps a class
    with no samples and no predicted mass at 0/eps instead of 0/0.
    """

    def __init__(self, eps: float = 1e-7):
        super().__init__()
        self.eps = float(eps)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p, y, _ = _softmax_or_sigmoid(_wide(logits), targets)
        tp = (p * y).sum(0)
        fp = (p * (1 - y)).sum(0)
        fn = ((1 - p) * y).sum(0)
        f1 = 2 * tp / (2 * tp + fp + fn + self.eps)
        return 1 - f1.mean()


@LOSSES.register
class ListNetLoss(nn.Module):
    """ListNet (top-one): cross-entropy between softmax(relevance) and softmax(scores) per query.

    Called as loss(scores, relevance, group); the mean is over the queries in the batch.
    """

    grouped = True

    def forward(self, scores: torch.Tensor, relevance: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        scores = scores.float().reshape(-1)
        _, inv = torch.unique(group.reshape(-1), return_inverse=True)
        n_groups = int(inv.max()) + 1
        target = _group_log_softmax(relevance.float().reshape(-1), inv, n_groups).exp()
        per_item = -target * _group_log_softmax(scores, inv, n_groups)
        return scores.new_zeros(n_groups).index_add(0, inv, per_item).mean()


def _group_log_softmax(x: torch.Tensor, inv: torch.Tensor, n: int) -> torch.Tensor:
    top = x.new_full((n,), float("-inf")).scatter_reduce(0, inv, x, "amax").detach()
    shifted = x - top[inv]
    total = x.new_zeros(n).index_add(0, inv, shifted.exp())
    return shifted - total.log()[inv]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half-precision logits under autocast), float64 kept (gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


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


# ------------------------------------------------------------------------------------------
# building from config specs
# ------------------------------------------------------------------------------------------
def balanced_class_weights(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """n / (C * count_c) per class (scikit-learn's 'balanced'); 0 for a class with no sample."""
    labels = labels.reshape(-1).long()
    counts = torch.bincount(labels, minlength=num_classes or 0).double()
    present = counts > 0
    w = torch.zeros_like(counts)
    w[present] = labels.numel() / (present.sum() * counts[present])
    return w.float()


def balanced_pos_weight(labels: torch.Tensor) -> torch.Tensor:
    """negatives / positives per label for BCEWithLogitsLoss(pos_weight=...); 1 for a label never positive."""
    y = labels.reshape(len(labels), -1).double()
    pos = y.sum(0)
    neg = len(y) - pos
    return torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos)).float()


def resolve_args(args: dict[str, Any], where: str, labels: Callable[[], torch.Tensor] | None,
                 num_classes: int | None) -> dict[str, Any]:
    """Lists become tensors; 'balanced' becomes weights computed from the training labels."""
    out = dict(args)
    for key in TENSOR_ARGS:
        value = out.get(key)
        if isinstance(value, str):
            if value != "balanced":
                raise ConfigError(f"{where}.{key}: expected a number, a list or 'balanced'; found {value!r}")
            if labels is None:
                raise ConfigError(f"{where}.{key}: 'balanced' needs the training labels, which are not"
                                  f" available here; give a list of weights")
            y = labels()
            if key == "pos_weight":
                out[key] = balanced_pos_weight(y)
            elif y.dim() > 1 and y.shape[1] > 1:
                raise ConfigError(f"{where}.{key}: 'balanced' class weights need single-label targets;"
                                  f" for multi-label use BCEWithLogitsLoss with pos_weight: balanced")
            else:
                out[key] = balanced_class_weights(y, num_classes)
        elif isinstance(value, (list, tuple)):
            out[key] = torch.as_tensor(value, dtype=torch.float32)
    return out


def make_loss(type_: str, args: dict[str, Any] | None = None, where: str = "loss",
              labels: Callable[[], torch.Tensor] | None = None, num_classes: int | None = None) -> nn.Module:
    """One loss from its registered name (or import path) and config arguments."""
    factory = LOSSES.get(type_, f"{where}.type")
    kwargs = resolve_args(dict(args or {}), f"{where}.args", labels, num_classes)
    return construct(factory, kwargs, where, type_)


def from_specs(specs: list[dict[str, Any]], where: str = "loss", labels: Callable[[], torch.Tensor] | None = None,
               num_classes: int | None = None) -> nn.Module:
    """One spec without a weight -> that loss; otherwise their WeightedSum. Specs: {type, args, weight}."""
    if len(specs) == 1 and specs[0].get("weight") is None:
        return make_loss(specs[0]["type"], specs[0].get("args"), where, labels, num_classes)
    losses = [make_loss(s["type"], s.get("args"), f"{where}.{i}", labels, num_classes) for i, s in enumerate(specs)]
    return WeightedSum(losses, [1.0 if s.get("weight") is None else float(s["weight"]) for s in specs])
