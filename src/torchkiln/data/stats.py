"""`kiln data stats`: class counts and imbalance (per head for a multihead task), image sizes,
per-channel mean/std, a class histogram."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from torchkiln.data.splits import dataset_labels
from torchkiln.data.wrappers import has_attr, unwrap


def _raw(dataset: Dataset) -> Dataset:
    """The training split without its transform wrapper (statistics describe the stored data)."""
    from torchkiln.data.transforms import Transformed

    return dataset.dataset if isinstance(dataset, Transformed) else dataset


def compute_stats(dataset: Dataset, class_names: list[str] | None, max_images: int = 2000,
                  seed: int = 0) -> dict[str, Any]:
    """Statistics of `dataset` (the training split); pixels from at most `max_images` samples."""
    out: dict[str, Any] = {"samples": len(dataset)}  # type: ignore[arg-type]
    labels = dataset_labels(dataset)
    matrix = _label_matrix(dataset)
    if labels is not None or matrix is not None:
        counts = np.bincount(labels, minlength=len(class_names or [])) if labels is not None \
            else matrix.sum(axis=0).astype(np.int64)
        out.update(class_summary(counts, class_names))
    n = len(dataset)  # type: ignore[arg-type]
    picks = np.random.default_rng(seed).permutation(n)[: min(n, max_images)]
    sizes: Counter = Counter()
    total = sq = None
    pixels = 0
    for i in sorted(picks.tolist()):
        sample = dataset[i]
        x = sample["input"] if isinstance(sample, dict) else sample[0] if isinstance(sample, (tuple, list)) else sample
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            continue
        x = x.unsqueeze(0) if x.dim() == 2 else x
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        sizes[(int(x.shape[-2]), int(x.shape[-1]))] += 1
        flat = x.reshape(x.shape[0], -1).double()
        if total is not None and flat.shape[0] != total.shape[0]:
            continue
        total = flat.sum(1) if total is None else total + flat.sum(1)
        sq = (flat**2).sum(1) if sq is None else sq + (flat**2).sum(1)
        pixels += flat.shape[1]
    if sizes:
        hs = [h for (h, _), c in sizes.items() for _ in range(c)]
        ws = [w for (_, w), c in sizes.items() for _ in range(c)]
        out["images_measured"] = sum(sizes.values())
        out["image_sizes"] = {"most_common": [f"{h}x{w} ({c})" for (h, w), c in sizes.most_common(5)],
                              "min_hw": [min(hs), min(ws)], "max_hw": [max(hs), max(ws)]}
        mean = total / pixels
        std = (sq / pixels - mean**2).clamp(min=0).sqrt()
        out["mean"] = [round(float(v), 4) for v in mean]
        out["std"] = [round(float(v), 4) for v in std]
    from torchkiln.data.tabular_stats import tabular_stats

    tabular = tabular_stats(dataset)
    if tabular is not None:
        out["tabular"] = tabular
    return out


def class_summary(counts: np.ndarray, class_names: list[str] | None = None) -> dict[str, Any]:
    """Counts by class name, the imbalance ratio (largest / smallest) and the classes with no sample."""
    names = list(class_names) if class_names and len(class_names) == len(counts) \
        else [str(i) for i in range(len(counts))]
    return {"class_counts": {n: int(c) for n, c in zip(names, counts)},
            "imbalance_ratio": float(counts.max() / counts.min()) if counts.min() > 0 else float("inf"),
            "classes_without_samples": [n for n, c in zip(names, counts) if c == 0]}


def head_stats(task: Any, dataset: Dataset, class_names: Any) -> dict[str, dict[str, Any]]:
    """A multihead task: class counts per head and of the combined class, from the stored targets
    (a dict by head, (N, heads) or the combined class); names from the dataset or the heads' `names`."""
    from torchkiln.data.targets import dataset_targets

    labels = task.head_targets(dataset_targets(dataset))
    out = {}
    for h, spec in task.heads.items():
        names = spec.names or (class_names.get(h) if isinstance(class_names, dict) else None)
        out[h] = class_summary(np.bincount(labels[h].numpy(), minlength=spec.classes), names)
    if task.combined:
        out[task.combined] = class_summary(np.bincount(task.encode(labels).numpy(), minlength=task.num_combined))
    return out


def _label_matrix(dataset: Dataset) -> np.ndarray | None:
    ds, index = unwrap(dataset, has_attr("label_matrix"))
    matrix = getattr(ds, "label_matrix", None)
    return matrix if matrix is None or index is None else matrix[index]


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"training samples   {stats['samples']}"]
    if "class_counts" in stats:
        width = max(len(k) for k in stats["class_counts"])
        lines.append("class counts")
        for name, c in stats["class_counts"].items():
            lines.append(f"  {name:<{width}}  {c}")
        lines.append(f"imbalance ratio    {stats['imbalance_ratio']:.2f} (largest / smallest class)")
    elif "heads" not in stats:
        lines.append("class counts       (no single-label or multi-label classes)")
    for head, part in stats.get("heads", {}).items():
        lines += _count_lines(part, f"{head}: ")
    if "image_sizes" in stats:
        s = stats["image_sizes"]
        lines.append(f"image sizes (HxW)  {', '.join(s['most_common'])}; min {s['min_hw'][0]}x{s['min_hw'][1]},"
                     f" max {s['max_hw'][0]}x{s['max_hw'][1]} (over {stats['images_measured']} images)")
        lines.append(f"mean               {stats['mean']}")
        lines.append(f"std                {stats['std']}")
        lines.append(f"  Normalize: {{type: Normalize, args: {{mean: {stats['mean']}, std: {stats['std']}}}}}")
    if "tabular" in stats:
        from torchkiln.data.tabular_stats import format_tabular

        lines += format_tabular(stats["tabular"])
    return "\n".join(lines)


def _count_lines(part: dict[str, Any], about: str) -> list[str]:
    """Counts with a bar each (a text histogram), then the imbalance ratio."""
    counts = part["class_counts"]
    width, top = max(len(k) for k in counts), max(max(counts.values()), 1)
    lines = [f"{about}class counts"]
    lines += [f"  {name:<{width}}  {c:>6}  {'#' * round(30 * c / top)}" for name, c in counts.items()]
    empty = part["classes_without_samples"]
    absent = f"; no sample of {len(empty)} class(es): {', '.join(empty[:10])}" if empty else ""
    lines.append(f"{about}imbalance ratio {part['imbalance_ratio']:.2f} (largest / smallest class){absent}")
    return lines


def save_histogram(stats: dict[str, Any], path: Path, title: str = "class counts") -> Path | None:
    if "class_counts" not in stats:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, counts = list(stats["class_counts"]), list(stats["class_counts"].values())
    fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), counts, color="#4C72B0")
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 10 else 0, ha="right" if len(names) > 10 else "center")
    ax.set_ylabel("samples")
    ax.set_title(f"{title} (imbalance ratio {stats['imbalance_ratio']:.2f})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def describe_split(train: Dataset, class_names: Any, task: Any, max_images: int = 2000, seed: int = 0
                   ) -> dict[str, Any]:
    """`compute_stats` of a training split as stored (without its transforms), with the class
    counts per head for a multihead task."""
    from torchkiln.tasks import MultiHeadTask

    stats = compute_stats(_raw(train), class_names if isinstance(class_names, list) else None,
                          max_images=max_images, seed=seed)
    if isinstance(task, MultiHeadTask):
        task.check_class_names(class_names)
        stats["heads"] = head_stats(task, _raw(train), class_names)
    return stats


def write_stats(stats: dict[str, Any], out_dir: Path) -> None:
    """stats.json and class_histogram.png (one per head too) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    save_histogram(stats, out_dir / "class_histogram.png")
    for head, part in stats.get("heads", {}).items():
        save_histogram(part, out_dir / f"class_histogram_{head}.png", f"{head}: class counts")
