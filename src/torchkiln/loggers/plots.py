"""Plots a person would rather look at than numbers: curves.png from the epoch history."""

from __future__ import annotations

from pathlib import Path


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
