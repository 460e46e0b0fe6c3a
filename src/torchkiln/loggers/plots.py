"""Plots a person would rather look at than numbers: curves, confusion matrix, per-class F1."""

from __future__ import annotations

from pathlib import Path

from torchkiln.callbacks.monitor import improved
from torchkiln.loggers.base import Logger
from torchkiln.loggers.validation import ValidationSample
from torchkiln.rundir import PLOTS


def plot_curves(history: list[dict[str, float]], path: str | Path, monitor: str | None = None) -> Path | None:
    """Loss, each metric (train and val), and the LR against epoch, one panel each."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = list(range(1, len(history) + 1))
    names = sorted({k.split("/", 1)[1] for row in history for k in row if k.startswith(("train/", "val/"))}
                   - {"loss_step", "grad_norm", "skipped_steps"})
    names = ["loss"] + [n for n in names if n != "loss"]
    has_lr = any(k.startswith("lr/") for k in history[0])
    panels = len(names) + (1 if has_lr else 0)
    cols = min(3, panels)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, name in zip(flat, names):
        for split, style in (("train", "-"), ("val", "--")):
            ys = [row.get(f"{split}/{name}") for row in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, [float("nan") if y is None else y for y in ys], style, marker="o", ms=3, label=split)
        title = name + ("  (monitored)" if monitor and monitor.endswith("/" + name) else "")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if has_lr:
        ax = flat[len(names)]
        for key in sorted(k for k in history[0] if k.startswith("lr/")):
            ax.plot(epochs, [row.get(key) for row in history], marker="o", ms=3, label=key.split("/", 1)[1])
        ax.set_title("learning rate (end of epoch)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in flat[panels:]:
        ax.axis("off")
    # Fixed margins in inches, not fig.tight_layout(): that draws the figure once more only to
    # measure it, a third of the plot's time (~60 of ~200 ms at the end of every run).
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=0.6 / w, right=1 - 0.15 / w, bottom=0.5 / h, top=1 - 0.35 / h, wspace=0.3,
                        hspace=0.75 / (h / rows - 0.85))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class ClassificationPlots(Logger):
    """plots/confusion_matrix.png, per_class_f1.png and per_class.csv from the best epoch's validation
    (for a multi-head task one of each per view: `confusion_matrix_<head>.png`, ...).

    "Best" follows the trainer's monitor, by the one improvement rule (callbacks/monitor.py) with the
    run's `min_delta`; a resumed run that never improves again uses its last epoch.
    """

    def __init__(self, run_dir: str | Path, class_names: list[str] | None = None):
        self.dir = Path(run_dir) / PLOTS
        self.class_names = class_names
        self.monitor: str | None = None
        self.mode = "max"
        self.min_delta = 0.0
        self.best: float | None = None
        self.latest: tuple[int, dict[str, ValidationSample]] | None = None
        self.chosen: tuple[int, dict[str, ValidationSample]] | None = None

    def start(self, info, resume_epoch=None, resume_step=0):
        self.monitor, self.mode = info.get("monitor"), info.get("mode") or "max"
        self.min_delta = float(info.get("min_delta", 0.0))
        self.best = info.get("best") if resume_epoch is not None else None
        self.latest = self.chosen = None

    def wants_validation(self, epoch):
        return True

    def log_validation(self, epoch, step, sample):
        if self.latest is None or self.latest[0] != epoch:
            self.latest = (epoch, {})
        self.latest[1][sample.view] = sample

    def log_epoch(self, epoch, step, record):
        if self.latest is None or self.latest[0] != epoch:
            return
        value = record.get(self.monitor) if self.monitor else None
        better = improved(value, self.best, self.mode, self.min_delta)
        if better or self.chosen is None and self.best is None:
            self.chosen = self.latest
            if better:
                self.best = value

    def finish(self, summary):
        chosen = self.chosen or self.latest
        if chosen is None:
            return
        epoch, samples = chosen
        for sample in samples.values():
            self._write(epoch, sample)

    def _write(self, epoch: int, sample: ValidationSample) -> None:
        from torchkiln.loggers.figures import per_class_f1_figure, save
        from torchkiln.loggers.images import confusion_image, save_png, view_class_names
        from torchkiln.metrics.confusion import per_class_scores
        from torchkiln.metrics.per_class import class_names as full_names
        from torchkiln.metrics.per_class import class_rows, write_per_class_csv

        names = view_class_names(sample, self.class_names)
        which = f"{sample.view + ' ' if sample.view else ''}validation, epoch {epoch}"
        suffix = f"_{sample.view}" if sample.view else ""
        cm = sample.confusion()
        save_png(confusion_image(cm, names, f"confusion matrix ({which})"), self.dir / f"confusion_matrix{suffix}.png")
        save(per_class_f1_figure(sample, names, f"per-class F1 ({which})"), self.dir / f"per_class_f1{suffix}.png")
        rows = class_rows(per_class_scores(cm), full_names(names, sample.num_classes))
        write_per_class_csv(rows, self.dir / f"per_class{suffix}.csv")
