"""Building a task from the config, and reading a dataset's targets (for `balanced` weights)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from torchkiln.registry import TASKS, check_args, construct


def build_task(spec: Any, where: str = "task"):
    """`task: name` or `task: {type, args}` (a registered name or an import path) -> a Task."""
    if isinstance(spec, str):
        name, args = spec, {}
    elif isinstance(spec, dict):
        name, args = spec["type"], dict(spec.get("args") or {})
    else:
        name, args = spec.type, dict(spec.args)
    factory = TASKS.get(name, where)
    check_args(factory, args, f"{where}.args")
    return construct(factory, args, where, f"task '{name}'")


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """All targets of a dataset (or Subset of one): its `targets` attribute when it has one, else read."""
    indices = None
    base = dataset
    while isinstance(base, Subset):
        idx = np.asarray(base.indices)
        indices = idx if indices is None else idx[indices]
        base = base.dataset
    values = getattr(base, "targets", None)
    if values is not None:
        t = torch.as_tensor(np.asarray(values))
        return t if indices is None else t[torch.as_tensor(indices, dtype=torch.long)]
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    first = items[0]
    if isinstance(first, dict):
        return torch.stack([torch.as_tensor(it["target"]) for it in items])
    return torch.stack([torch.as_tensor(it[1]) for it in items])
