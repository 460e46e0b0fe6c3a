"""Query ids of a ranking data set: read from the dataset (`groups`), never by decoding samples."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from torchkiln.data.wrappers import has_attr, unwrap

GROUP_ATTRS = ("groups", "query_ids")


def dataset_groups(dataset: Dataset) -> np.ndarray | None:
    """One query id per sample when the dataset or one it wraps exposes them (`groups` or
    `query_ids`), else None; through Subsets (taking their indices) and wrappers (data/wrappers.py)."""
    ds, index = unwrap(dataset, has_attr(*GROUP_ATTRS))
    for attr in GROUP_ATTRS:
        values = getattr(ds, attr, None)
        if values is not None:
            values = np.asarray(values).reshape(-1)
            if len(values) != len(ds):  # type: ignore[arg-type]
                return None
            return values if index is None else values[index]
    return None


def query_members(groups: np.ndarray) -> list[np.ndarray]:
    """The positions of each query's items, queries in order of first appearance, items in order."""
    groups = np.asarray(groups).reshape(-1)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # query k of the data set is the k-th to appear
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    by_query = np.argsort(rank[inverse.reshape(-1)], kind="stable")
    counts = np.bincount(rank[inverse.reshape(-1)], minlength=len(order))
    return np.split(by_query, np.cumsum(counts)[:-1]) if len(order) else []
