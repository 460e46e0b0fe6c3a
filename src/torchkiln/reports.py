"""Per-class reports for `kiln test`: precision / recall / F1 / support tables and confusion matrices.

Counts come from the confusion matrix of every sample of the split, so the table agrees with
scikit-learn's `classification_report` (zero_division=0).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from torchkiln.tasks.base import ReportView


@torch.inference_mode()
def collect(trainer: Any, loader: Iterable) -> tuple[Any, Any]:
    """The model's outputs and the targets for every batch of `loader`, concatenated on the CPU."""
    from torchkiln.engine.device import move_to

    trainer._setup()
    trainer.model.eval()
    outs: list[Any] = []
    tgts: list[Any] = []
    for batch in loader:
        batch = move_to(batch, trainer.device)
        with trainer.stepper.autocast():
            outputs, targets = trainer.task.forward(trainer.model, batch)
        if targets is None:
            return None, None
        outs.append(_to_cpu(outputs))
        tgts.append(_to_cpu(targets))
    return _cat(outs), _cat(tgts)


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _cat(parts: list[Any]) -> Any:
    if not parts:
        return None
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    return type(first)(torch.cat([p[i] for p in parts]) for i in range(len(first)))


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = true class, columns = predicted class (scikit-learn's convention)."""
    idx = targets.reshape(-1).long() * num_classes + preds.reshape(-1).long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _prf(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> tuple[torch.Tensor, ...]:
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300),
                     torch.zeros_like(tp))
    return precision, recall, f1


def per_class_rows(view: ReportView) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
    """Rows {class, precision, recall, f1, support} plus macro/weighted averages, and the confusion matrix."""
    n = view.num_classes
    names = view.class_names if view.class_names and len(view.class_names) == n else [str(i) for i in range(n)]
    if view.kind == "multilabel":
        p, t = view.preds.long(), view.targets.long()
        tp, fp, fn = (p * t).sum(0), (p * (1 - t)).sum(0), ((1 - p) * t).sum(0)
        support, cm = t.sum(0), None
    else:
        cm = confusion_matrix(view.preds, view.targets, n)
        tp = cm.diag()
        fp, fn, support = cm.sum(0) - tp, cm.sum(1) - tp, cm.sum(1)
    precision, recall, f1 = _prf(tp, fp, fn)
    rows = [{"class": names[i], "precision": float(precision[i]), "recall": float(recall[i]),
             "f1": float(f1[i]), "support": int(support[i])} for i in range(n)]
    total = int(support.sum())
    w = support.double() / max(total, 1)
    # Macro over the classes present in targets or predictions, as scikit-learn does by default.
    present = (support > 0) | (tp + fp > 0)
    k = max(int(present.sum()), 1)
    rows.append({"class": "macro avg", "precision": float(precision[present].sum() / k),
                 "recall": float(recall[present].sum() / k), "f1": float(f1[present].sum() / k), "support": total})
    rows.append({"class": "weighted avg", "precision": float((precision * w).sum()),
                 "recall": float((recall * w).sum()), "f1": float((f1 * w).sum()), "support": total})
    return rows, cm


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


def plot_confusion(cm: torch.Tensor, names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    n = cm.shape[0]
    size = min(4 + 0.45 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(cm.numpy(), cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), names, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        top = cm.max().item() or 1
        for i in range(n):
            for j in range(n):
                v = int(cm[i, j])
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                        color="white" if v > top / 2 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(views: list[ReportView], run_dir: Path, split: str) -> str:
    """Write <split>[_<view>]_per_class.csv, _confusion_matrix.csv and plots/..png; return the tables."""
    texts = []
    for view in views:
        stem = f"{split}_{view.name}" if view.name else split
        rows, cm = per_class_rows(view)
        with open(run_dir / f"{stem}_per_class.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["class", "precision", "recall", "f1", "support"])
            writer.writeheader()
            writer.writerows(rows)
        texts.append(format_table(rows, f"[{view.name or 'classes'}] {split}"))
        if cm is not None:
            names = [r["class"] for r in rows[: view.num_classes]]
            with open(run_dir / f"{stem}_confusion_matrix.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["true \\ predicted", *names])
                for name, row in zip(names, cm.tolist()):
                    writer.writerow([name, *row])
            plot_confusion(cm, names, run_dir / "plots" / f"{stem}_confusion_matrix.png",
                           f"{view.name or 'confusion matrix'} ({split})")
    text = "\n\n".join(texts)
    if text:
        (run_dir / f"{split}_report.txt").write_text(text + "\n")
    return text
