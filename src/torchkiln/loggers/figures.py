"""The matplotlib (Agg) PNGs of plots/, drawn once at the end of a run. The confusion matrix, there
and in every epoch's TensorBoard and W&B pictures, is drawn by images.py, far cheaper."""

from __future__ import annotations

from pathlib import Path

from torchkiln.loggers.images import class_label
from torchkiln.loggers.validation import ValidationSample


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def per_class_f1_figure(sample: ValidationSample, class_names: list[str] | None = None, title: str = ""):
    from torchkiln.metrics.confusion import per_class_scores

    plt = pyplot()
    f1 = per_class_scores(sample.confusion())["f1"].numpy()
    c = sample.num_classes
    fig, ax = plt.subplots(figsize=(min(3 + 0.4 * c, 20), 3.6))
    ax.bar(range(c), f1, color="tab:blue")
    ax.axhline(f1.mean(), color="tab:red", ls="--", lw=1, label=f"macro {f1.mean():.3f}")
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
