"""The one walk through dataset wrappers: Subsets (their indices composed) and the wrappers that
hold the dataset they change as `.dataset` (transforms, standardization, seeded fetching)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch.utils.data import Dataset, Subset


def unwrap(dataset: Dataset, until: Callable[[Dataset], bool] | None = None, *,
           wrappers: bool = True) -> tuple[Dataset, np.ndarray | None]:
    """The first dataset at or under `dataset` (Subsets aside) for which `until` holds, else the
    innermost one, with the positions in it of `dataset`'s samples (None: the same positions).

    Subsets are always looked through; `wrappers=False` stops at the first dataset that is not a
    Subset (for readers of the stored samples, which a transform wrapper changes).
    """
    index: np.ndarray | None = None
    ds = dataset
    while True:
        if isinstance(ds, Subset):
            idx = np.asarray(ds.indices, dtype=np.int64)
            index = idx if index is None else idx[index]
            ds = ds.dataset
            continue
        if until is not None and until(ds):
            return ds, index
        inner = getattr(ds, "dataset", None) if wrappers else None
        if not isinstance(inner, Dataset):
            return ds, index
        ds = inner


def has_attr(*names: str) -> Callable[[Dataset], bool]:
    """An `until` for `unwrap`: the dataset has one of the attributes `names` (not None)."""
    return lambda ds: any(getattr(ds, n, None) is not None for n in names)


def class_names_of(dataset: Dataset) -> list[str] | None:
    """The class names of the dataset under Subsets and wrappers (transforms, seeded fetching)."""
    names = getattr(unwrap(dataset, has_attr("classes"))[0], "classes", None)
    return [str(c) for c in names] if names is not None else None
