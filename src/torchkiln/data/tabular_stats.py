"""`kiln data stats` for tabular data (one 1-D feature vector per sample): per-feature mean, std,
min and max, the target's distribution, and for ranking data the queries' sizes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

SHOWN_FEATURES = 20  # listed on the console; stats.json holds them all


def _first_input(dataset: Dataset) -> Any:
    sample = dataset[0]
    if isinstance(sample, dict):
        return sample.get("input")
    return sample[0] if isinstance(sample, (tuple, list)) else sample


def _summary(v: np.ndarray) -> dict[str, Any]:
    """mean, std, min, quartiles and max per column of `v` (N,) or (N, T)."""
    q = np.quantile(v, [0.0, 0.25, 0.5, 0.75, 1.0], axis=0)

    def r(a: np.ndarray) -> Any:
        return round(float(a), 6) if np.ndim(a) == 0 else [round(float(x), 6) for x in a]

    return {"mean": r(v.mean(0)), "std": r(v.std(0)), "min": r(q[0]), "p25": r(q[1]), "median": r(q[2]),
            "p75": r(q[3]), "max": r(q[4])}


def tabular_stats(dataset: Dataset) -> dict[str, Any] | None:
    """Statistics of a tabular (split of a) dataset; None when its inputs are not 1-D vectors."""
    from torchkiln.data.groups import dataset_groups
    from torchkiln.data.normalize import sample_columns

    if len(dataset) == 0:  # type: ignore[arg-type]
        return None
    first = _first_input(dataset)
    if not isinstance(first, (torch.Tensor, np.ndarray)) or np.ndim(first) != 1:
        return None
    x, y = sample_columns(dataset)
    xs = x.double().numpy()
    std = xs.std(0)
    out: dict[str, Any] = {"features": {
        "count": int(xs.shape[1]),
        "mean": [round(float(v), 6) for v in xs.mean(0)], "std": [round(float(v), 6) for v in std],
        "min": [round(float(v), 6) for v in xs.min(0)], "max": [round(float(v), 6) for v in xs.max(0)],
        "constant": [int(i) for i in np.flatnonzero(std == 0)],
    }}
    varying = std[std > 0]
    if len(varying):
        out["features"]["std_ratio"] = round(float(varying.max() / varying.min()), 3)
    if y is not None:
        ys = y.numpy()
        if y.is_floating_point():
            out["target"] = {"kind": "real", **_summary(ys.astype(np.float64))}
        elif ys.ndim == 1:
            values, counts = np.unique(ys, return_counts=True)
            out["target"] = {"kind": "integer", "counts": {str(int(v)): int(c) for v, c in zip(values, counts)}}
    groups = dataset_groups(dataset)
    if groups is not None:
        _, sizes = np.unique(groups, return_counts=True)
        out["queries"] = {"count": int(len(sizes)), "items_min": int(sizes.min()),
                          "items_mean": round(float(sizes.mean()), 3), "items_max": int(sizes.max())}
    return out


def format_tabular(stats: dict[str, Any]) -> list[str]:
    f = stats["features"]
    lines = [f"features           {f['count']} (mean, std, min, max over the training split)"]
    width = len(str(f["count"] - 1))
    lines.append(f"  {'#':>{width}}  {'mean':>12} {'std':>12} {'min':>12} {'max':>12}")
    for i in range(min(f["count"], SHOWN_FEATURES)):
        lines.append(f"  {i:>{width}}  {f['mean'][i]:>12.5g} {f['std'][i]:>12.5g} {f['min'][i]:>12.5g}"
                     f" {f['max'][i]:>12.5g}")
    if f["count"] > SHOWN_FEATURES:
        lines.append(f"  ... {f['count'] - SHOWN_FEATURES} more features in stats.json")
    if f["constant"]:
        lines.append(f"constant features  {f['constant']}")
    if f.get("std_ratio", 1.0) > 10:
        lines.append(f"feature scales     std differs {f['std_ratio']:.3g}x between features;"
                     " data.normalize: true standardizes them")
    t = stats.get("target")
    if t is not None and t["kind"] == "real":
        lines.append("target             " + ", ".join(f"{k} {t[k]}" for k in
                                                       ("mean", "std", "min", "p25", "median", "p75", "max")))
    elif t is not None:
        lines.append("target values      " + ", ".join(f"{v}: {c}" for v, c in t["counts"].items()))
    q = stats.get("queries")
    if q is not None:
        lines.append(f"queries            {q['count']}; items per query min {q['items_min']}, mean"
                     f" {q['items_mean']}, max {q['items_max']}")
    return lines
