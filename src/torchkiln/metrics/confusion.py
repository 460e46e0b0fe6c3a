"""Single-label classification metrics from one confusion matrix.

Accuracy, balanced accuracy, and precision / recall / F1 (micro, macro, weighted, per class) are
all functions of the C x C confusion matrix. Each metric here keeps that matrix as its state
(summed over batches and, under DDP, over ranks) and updates it with one `bincount`. Built on
torchkiln's metric base (metrics/base.py), so a run with the default metrics never imports
torchmetrics (about 4 s of start-up on 2 cores); per step it costs what torchmetrics' classes cost
(benchmarks/replacements.py). With torchmetrics' own arguments, a name gives torchmetrics' class.
`kiln test`'s per-class tables use the functions below.

Averages follow scikit-learn (zero_division=0): a macro average leaves out the classes that neither
occur nor are predicted; a weighted one weighs each class by its support; balanced accuracy is the
mean recall over the classes that occur in the targets (a class only predicted does not count);
`binary` is the score of class 1 of two (scikit-learn's `pos_label=1`). Targets below 0
(CrossEntropyLoss's ignore_index, -100 by default) and targets equal to `ignore_index` are left
out; a target at or above `num_classes` is an error, raised when the metric is computed.
"""

from __future__ import annotations

import torch

from torchkiln.metrics.base import Metric

AVERAGES = ("micro", "macro", "weighted", "none", "binary")
STATS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1")


class ConfusionMetric(Metric):
    """`stat` (accuracy, precision, recall, f1) averaged by `average` (micro, macro, weighted, none).

    `update(preds, target)`: `preds` are scores (N, C) (their argmax is the prediction) or labels
    (N,); `target` labels (N,).
    """

    higher_is_better = True

    def __init__(self, num_classes: int, stat: str = "accuracy", average: str = "micro",
                 ignore_index: int | None = None):
        super().__init__()
        if stat not in STATS:
            raise ValueError(f"stat: expected one of {', '.join(STATS)}; found {stat!r}")
        if average not in AVERAGES:
            raise ValueError(f"average: expected one of {', '.join(AVERAGES)}; found {average!r}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes: expected a positive integer; found {num_classes!r}")
        if average == "binary" and int(num_classes) != 2:
            raise ValueError(f"'{stat}' is the binary score of class 1 of two classes; this model has"
                             f" {num_classes} (use {stat}_macro, {stat}_micro or {stat}_weighted)")
        self.ignore_index = ignore_index
        self.num_classes = int(num_classes)
        self.stat = stat
        self.average = average
        c = self.num_classes
        self.add_state("confmat", torch.zeros(c, c, dtype=torch.long))
        self.add_state("out_of_range", torch.zeros((), dtype=torch.long))

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        target = target.reshape(-1).long()
        if self.ignore_index is not None:
            target = torch.where(target == self.ignore_index, -1, target)
        labels = preds.argmax(dim=1) if preds.dim() == 2 else preds
        labels = labels.reshape(-1).long()
        if labels.shape != target.shape:
            raise ValueError(f"{len(labels)} predictions for {len(target)} targets")
        counts, out_of_range = confusion_counts(labels, target, self.num_classes)
        self.confmat += counts
        self.out_of_range += out_of_range

    def score(self) -> torch.Tensor:
        bad = int(self.out_of_range)
        if bad:
            raise ValueError(f"{bad} targets are not class indices below num_classes={self.num_classes};"
                             " check the labels or model.args.num_classes")
        return confusion_score(self.confmat, self.stat, self.average)


def confusion_counts(labels: torch.Tensor, target: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (C, C) confusion matrix (rows: targets, columns: predicted labels) and the number of
    targets at or above `num_classes`; targets below 0 (ignored) are left out. One `bincount`."""
    c = num_classes
    target, labels = target.reshape(-1).long(), labels.reshape(-1).long()
    # Cells c*c (ignored target) and c*c + 1 (target out of range) collect what is left out,
    # without indexing by a mask (which would wait for the device).
    cell = torch.where(target < 0, c * c, torch.where(target >= c, c * c + 1, target * c + labels.clamp(0, c - 1)))
    counts = torch.bincount(cell, minlength=c * c + 2)
    return counts[: c * c].view(c, c), counts[c * c + 1]


def confusion_matrix(labels: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = true class, columns = predicted class (scikit-learn's convention);
    targets outside the classes (a loss's ignore_index) are left out."""
    return confusion_counts(labels, targets, num_classes)[0]


def class_scores(tp: torch.Tensor, predicted: torch.Tensor, support: torch.Tensor) -> dict[str, torch.Tensor]:
    """support, predicted, precision, recall and F1 of each class (float64; 0 where undefined)
    from its true positives, predicted count (tp + fp) and support (tp + fn)."""
    tp, predicted, support = tp.double(), predicted.double(), support.double()
    return {"support": support, "predicted": predicted, "precision": _ratio(tp, predicted),
            "recall": _ratio(tp, support), "f1": _ratio(2 * tp, support + predicted)}


def per_class_scores(confmat: torch.Tensor) -> dict[str, torch.Tensor]:
    """`class_scores` from a confusion matrix (rows: targets, columns: predictions)."""
    m = confmat.double()
    return class_scores(m.diagonal(), m.sum(0), m.sum(1))


def average_scores(per_class: torch.Tensor, scores: dict[str, torch.Tensor], average: str) -> torch.Tensor:
    """A per-class score averaged as scikit-learn does: `weighted` by support, `macro` over the
    classes that occur or are predicted (float64)."""
    support = scores["support"]
    if average == "weighted":
        return _ratio((per_class * support).sum(), support.sum())
    if average != "macro":
        raise ValueError(f"average: expected macro or weighted; found {average!r}")
    seen = (support + scores["predicted"]) > 0
    return _ratio((per_class * seen).sum(), seen.sum())


def confusion_score(confmat: torch.Tensor, stat: str, average: str) -> torch.Tensor:
    """`stat` from a confusion matrix (rows: targets, columns: predictions)."""
    if stat == "balanced_accuracy":  # scikit-learn: mean recall over the classes in the targets
        scores = per_class_scores(confmat)
        present = scores["support"] > 0
        return _ratio((scores["recall"] * present).sum(), present.sum()).float()
    if average == "micro":
        # Single-label: every sample is one prediction, so micro precision = recall = F1 = accuracy.
        m = confmat.double()
        return _ratio(m.diagonal().sum(), m.sum()).float()
    scores = per_class_scores(confmat)
    # accuracy averaged over classes is recall (torchmetrics' macro accuracy)
    per_class = scores["recall" if stat == "accuracy" else stat]
    if average == "none":
        return per_class.float()
    if average == "binary":
        return per_class[1].float()
    return average_scores(per_class, scores, average).float()


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, 0 where b is 0."""
    return torch.where(b > 0, a / b.clamp(min=1e-300), torch.zeros_like(a))
