"""All targets of a dataset (for `balanced` weights, class counts and multihead checks)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from torchkiln.data.wrappers import has_attr, unwrap

Targets = torch.Tensor | dict[str, torch.Tensor]


def dataset_targets(dataset: Dataset) -> Targets:
    """All targets of a dataset: the stored `head_targets` (a dict by head) or `targets` of it or of a
    dataset it wraps (Subsets, transform wrappers), else read sample by sample."""
    stored = _stored_targets(dataset)
    if stored is not None:
        return stored
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    targets = [it["target"] if isinstance(it, dict) else it[1] for it in items]
    if isinstance(targets[0], dict):
        return {k: torch.stack([torch.as_tensor(t[k]) for t in targets]) for k in targets[0]}
    return torch.stack([torch.as_tensor(t) for t in targets])


def _stored_targets(dataset: Dataset) -> Targets | None:
    ds, index = unwrap(dataset, has_attr("head_targets", "targets"))
    heads = getattr(ds, "head_targets", None)
    if heads is not None:
        stored: Targets = {k: torch.as_tensor(np.asarray(v)) for k, v in heads.items()}
    elif getattr(ds, "targets", None) is not None:
        stored = torch.as_tensor(np.asarray(ds.targets))  # type: ignore[attr-defined]
    else:
        return None
    if index is None:
        return stored
    idx = torch.as_tensor(index, dtype=torch.long)
    return {k: v[idx] for k, v in stored.items()} if isinstance(stored, dict) else stored[idx]
