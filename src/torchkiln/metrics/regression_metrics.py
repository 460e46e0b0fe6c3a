"""Regression metrics kept in float64 whose multi-target convention follows scikit-learn (torchkiln's
metric base: no torchmetrics import for a regression run with the default metrics)."""

from __future__ import annotations

import torch
from torch import Tensor

from torchkiln.metrics.base import Metric


class _PerTarget(Metric):
    """The squared errors of each of `num_targets` targets, in float64."""

    def __init__(self, num_targets: int = 1):
        super().__init__()
        if int(num_targets) < 1:
            raise ValueError(f"num_targets: expected a positive integer; found {num_targets!r}")
        self.num_targets = int(num_targets)
        self.add_state("sum_squared_error", torch.zeros(self.num_targets, dtype=torch.float64))

    def _rows(self, preds: Tensor, target: Tensor, name: str) -> tuple[Tensor, Tensor, int]:
        """(preds, target) as float64 (N, T), and N; the squared errors are added."""
        rows = target.shape[0] if target.dim() else 1
        target = target.double().reshape(rows, -1)
        preds = preds.double().reshape(target.shape)
        if target.shape[1] != self.num_targets:
            raise ValueError(f"{name}: {target.shape[1]} targets per sample, built for {self.num_targets}"
                             " (set the task's `targets`)")
        self.sum_squared_error += (preds - target).square().sum(0)
        return preds, target, rows


class PerTargetRMSE(_PerTarget):
    """RMSE of each target, averaged over targets: scikit-learn's `root_mean_squared_error`
    (multioutput='uniform_average'), not the RMSE over all elements. One target: the plain RMSE.

    `update(preds, target)`: (N,) or (N, T), with T = `num_targets`.
    """

    higher_is_better = False

    def __init__(self, num_targets: int = 1):
        super().__init__(num_targets)
        self.add_state("total", torch.zeros((), dtype=torch.long))

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.total += self._rows(preds, target, "rmse")[2]

    def score(self) -> Tensor:
        return (self.sum_squared_error / self.total).sqrt().mean().float()


class R2(_PerTarget):
    """scikit-learn's `r2_score`: per target 1 - SSE / total sum of squares (1 for a perfect fit of
    constant targets, 0 for an imperfect one), averaged over targets.

    The total sum of squares is merged from per-update means and sums of squared deviations (Chan
    et al.), not from sums of y and y^2, so neither a large offset nor a small spread loses digits.
    """

    higher_is_better = True

    def __init__(self, num_targets: int = 1):
        super().__init__(num_targets)
        self.add_state("counts", [], "cat")  # per update: rows
        self.add_state("means", [], "cat")  # per update: (T,) mean of the targets
        self.add_state("deviations", [], "cat")  # per update: (T,) sum of squared deviations

    def update(self, preds: Tensor, target: Tensor) -> None:
        preds, target, rows = self._rows(preds, target, "r2")
        if rows == 0:
            return
        mean = target.mean(0)
        self.counts.append(torch.tensor([rows], dtype=torch.float64, device=target.device))
        self.means.append(mean[None])
        self.deviations.append((target - mean).square().sum(0)[None])

    def score(self) -> Tensor:
        if not self.counts:
            return torch.tensor(float("nan"))
        counts = torch.cat(self.counts)[:, None]
        means = torch.cat(self.means).reshape(-1, self.num_targets)
        deviations = torch.cat(self.deviations).reshape(-1, self.num_targets)
        total = counts.sum()
        if float(total) < 2:
            return torch.tensor(float("nan"))  # as scikit-learn: undefined for one sample
        mean = (counts * means).sum(0) / total
        mean = torch.where((means == means[:1]).all(0), means[0], mean)  # constant targets: exact
        tss = deviations.sum(0) + (counts * (means - mean).square()).sum(0)
        sse = self.sum_squared_error
        score = torch.where(tss > 0, 1 - sse / tss.clamp(min=1e-300), torch.where(sse > 0, 0.0, 1.0))
        return score.mean()


class _MeanError(Metric):
    """The mean of an error over every element (for several targets: the mean of the per-target
    means, scikit-learn's 'uniform_average'), summed in float64."""

    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("sum_error", torch.zeros((), dtype=torch.float64))
        self.add_state("total", torch.zeros((), dtype=torch.long))

    def error(self, diff: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor) -> None:
        diff = preds.double().reshape(target.shape) - target.double()
        self.sum_error += self.error(diff).sum()
        self.total += diff.numel()

    def score(self) -> Tensor:
        return self.sum_error / self.total


class MAE(_MeanError):
    """scikit-learn's `mean_absolute_error`. `update(preds, target)`: (N,) or (N, T)."""

    def error(self, diff: Tensor) -> Tensor:
        return diff.abs()


class MSE(_MeanError):
    """scikit-learn's `mean_squared_error`. `update(preds, target)`: (N,) or (N, T)."""

    def error(self, diff: Tensor) -> Tensor:
        return diff.square()
