"""Per-class tables: precision / recall / F1 / support rows and their one CSV writer (for `kiln
test`'s reports and the plots logger), and `kiln test`'s tables and confusion matrices.

Scores come from metrics/confusion.py, from the confusion matrix of every sample of the split, so
the table agrees with scikit-learn's `classification_report` (zero_division=0).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from torchkiln.engine.device import cat_outputs, to_cpu
from torchkiln.loggers.images import confusion_image, save_png
from torchkiln.metrics.confusion import (
    average_scores,
    class_scores,
    confusion_matrix,
    per_class_scores,
)
from torchkiln.tasks.base import ReportView

CSV_COLUMNS = ("class", "precision", "recall", "f1", "support")


@torch.inference_mode()
def collect(trainer: Any, loader: Iterable) -> tuple[Any, Any]:
    """The model's outputs and the targets for every batch of `loader`, concatenated on the CPU
    (through the Trainer's one forward pass); (None, None) when the loader has no targets."""
    outs: list[Any] = []
    tgts: list[Any] = []
    for _, outputs, targets in trainer.forward_pass(loader):
        if targets is None:
            return None, None
        outs.append(to_cpu(outputs))
        tgts.append(to_cpu(targets))
    return (cat_outputs(outs), cat_outputs(tgts)) if outs else (None, None)


def class_names(names: list[str] | None, num_classes: int) -> list[str]:
    """The view's names when there is one per class, else the class indices."""
    return list(names) if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


def class_rows(scores: dict[str, torch.Tensor], names: list[str]) -> list[dict[str, Any]]:
    """One row {class, precision, recall, f1, support} per class, from `confusion.class_scores`."""
    return [{"class": name, "precision": float(scores["precision"][i]), "recall": float(scores["recall"][i]),
             "f1": float(scores["f1"][i]), "support": int(scores["support"][i])} for i, name in enumerate(names)]


def average_rows(scores: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """The macro and weighted average rows (scikit-learn's classification_report)."""
    total = int(scores["support"].sum())
    return [{"class": f"{avg} avg", **{k: float(average_scores(scores[k], scores, avg)) for k in ("precision", "recall", "f1")},
             "support": total} for avg in ("macro", "weighted")]


def per_class_rows(view: ReportView) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
    """Rows {class, precision, recall, f1, support} plus macro/weighted averages, and the confusion matrix."""
    n = view.num_classes
    if view.kind == "multilabel":
        p, t = view.preds.long(), view.targets.long()
        scores, cm = class_scores((p * t).sum(0), p.sum(0), t.sum(0)), None
    else:
        cm = confusion_matrix(view.preds, view.targets, n)
        scores = per_class_scores(cm)
    return class_rows(scores, class_names(view.class_names, n)) + average_rows(scores), cm


def write_per_class_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """The per-class table as CSV: class, precision, recall, f1 (6 decimals), support."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r["class"], *(f"{r[k]:.6f}" for k in ("precision", "recall", "f1")), r["support"]])
    return path


def format_table(rows: list[dict[str, Any]], title: str = "") -> str:
    width = max([len("class")] + [len(str(r["class"])) for r in rows])
    lines = [title] if title else []
    lines.append(f"{'class':>{width}}  precision  recall      f1  support")
    for r in rows:
        if r["class"] == "macro avg":
            lines.append("")
        lines.append(f"{r['class']:>{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:6.4f}"
                     f"  {r['support']:7d}")
    return "\n".join(lines)


def write_reports(views: list[ReportView], run_dir: Path, split: str) -> str:
    """Write <split>[_<view>]_per_class.csv, _confusion_matrix.csv and plots/..png; return the tables."""
    texts = []
    for view in views:
        stem = f"{split}_{view.name}" if view.name else split
        rows, cm = per_class_rows(view)
        write_per_class_csv(rows, run_dir / f"{stem}_per_class.csv")
        texts.append(format_table(rows, f"[{view.name or 'classes'}] {split}"))
        if cm is not None:
            names = [r["class"] for r in rows[: view.num_classes]]
            with open(run_dir / f"{stem}_confusion_matrix.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["true \\ predicted", *names])
                for name, row in zip(names, cm.tolist()):
                    writer.writerow([name, *row])
            save_png(confusion_image(cm, names, f"{view.name or 'confusion matrix'} ({split})"),
                     run_dir / "plots" / f"{stem}_confusion_matrix.png")
    text = "\n\n".join(texts)
    if text:
        (run_dir / f"{split}_report.txt").write_text(text + "\n")
    return text
