"""The PNGs of plots/, drawn once at the end of a run with matplotlib (Agg). The pictures logged every
epoch to TensorBoard and W&B are drawn by images.py, far cheaper."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from torchkiln.loggers.images import class_label
from torchkiln.loggers.validation import ValidationSample


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt




def per_class(sample: ValidationSample) -> dict[str, np.ndarray]:
    """support, precision, recall and F1 per class from the confusion matrix (0 where undefined)."""
    from torchkiln.confusion import per_class_scores

    scores = per_class_scores(sample.confusion())
    return {"support": scores["support"].numpy().astype(int),
            **{k: scores[k].numpy() for k in ("precision", "recall", "f1")}}


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def confusion_figure(sample: ValidationSample, class_names: list[str] | None = None, title: str = ""):
    """Row-normalized colours, raw counts written in the cells when there are few classes."""
    plt = pyplot()
    cm = sample.confusion().numpy()
    c = sample.num_classes
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.45 * c, 16)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if c <= 30:
        labels = [class_label(i, class_names) for i in range(c)]
        ax.set_xticks(range(c), labels, rotation=90 if c > 10 else 0)
        ax.set_yticks(range(c), labels)
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    return fig


def per_class_f1_figure(sample: ValidationSample, class_names: list[str] | None = None, title: str = ""):
    plt = pyplot()
    stats = per_class(sample)
    c = sample.num_classes
    fig, ax = plt.subplots(figsize=(min(3 + 0.4 * c, 20), 3.6))
    ax.bar(range(c), stats["f1"], color="tab:blue")
    ax.axhline(stats["f1"].mean(), color="tab:red", ls="--", lw=1, label=f"macro {stats['f1'].mean():.3f}")
    if c <= 60:
        ax.set_xticks(range(c), [class_label(i, class_names) for i in range(c)], rotation=90 if c > 10 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class")
    ax.set_ylabel("F1")
    ax.set_title(title or "per-class F1")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
