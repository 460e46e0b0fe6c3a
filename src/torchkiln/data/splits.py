"""Seeded, optionally stratified train/val/test splits."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset, Subset

from torchkiln.data.wrappers import has_attr, unwrap
from torchkiln.errors import DataError


def dataset_labels(dataset: Dataset) -> np.ndarray | None:
    """Class labels without decoding samples, when the dataset or one it wraps exposes them
    (`targets`); through Subsets (taking their indices) and wrappers (data/wrappers.py)."""
    ds, index = unwrap(dataset, has_attr("targets", "labels"))
    for attr in ("targets", "labels"):
        values = getattr(ds, attr, None)
        if values is not None:
            values = np.asarray(values)
            if values.ndim != 1 or values.dtype.kind not in "iub":
                return None
            return values if index is None else values[index]
    return None


def kfold_indices(n: int, folds: int, fold: int, seed: int, labels: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions in range(n) for fold `fold` of `folds`: seeded, stratified by labels.

    The folds' validation parts are disjoint and together cover range(n).
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    if not 0 <= fold < folds:
        raise DataError(f"data.fold: {fold} is outside 0..{folds - 1}")
    if n < folds:
        raise DataError(f"data.folds: {folds} folds need at least {folds} samples; found {n}")
    if labels is not None:
        counts = np.bincount(labels)
        if counts[counts > 0].min() < folds:
            rare = int(np.flatnonzero((counts > 0) & (counts < folds))[0])
            raise DataError(f"data.folds: class {rare} has {counts[rare]} samples, fewer than {folds} folds;"
                            f" use fewer folds or data.stratify: false")
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = list(splitter.split(np.zeros(n), labels))
    else:
        parts = list(KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(n)))
    train, val = parts[fold]
    return np.sort(train), np.sort(val)


def split_indices(
    n: int, fractions: list[float], seed: int, labels: np.ndarray | None = None
) -> list[np.ndarray]:
    """Split range(n) into len(fractions)+1 parts: the remainder first, then one per fraction."""
    from sklearn.model_selection import train_test_split

    rest = np.arange(n)
    parts: list[np.ndarray] = []
    remaining = 1.0
    for frac in fractions:
        if frac <= 0:
            parts.append(np.array([], dtype=np.int64))
            continue
        size = frac / remaining
        strat = labels[rest] if labels is not None else None
        try:
            rest, part = train_test_split(rest, test_size=size, random_state=seed, stratify=strat)
        except ValueError as exc:
            raise DataError(f"cannot split {n} samples into fraction {frac}: {exc}") from exc
        parts.append(np.sort(part))
        remaining -= frac
    return [np.sort(rest), *parts]


def split_dataset(
    dataset: Dataset, val: float, test: float, seed: int, stratify: bool = True,
    folds: int | None = None, fold: int = 0,
) -> tuple[Subset, Subset | None, Subset | None]:
    """Seeded train/val/test Subsets; with `folds`, the test part is held out first and fold
    `fold` of the rest is the validation part (`val` is then unused).

    A data set with query ids (`groups`, see data/groups.py) is split by query: every query's
    items land in one part, and the fractions count queries (not stratified)."""
    from torchkiln.data.groups import dataset_groups, query_members

    groups = dataset_groups(dataset)
    members = query_members(groups) if groups is not None else None
    labels = dataset_labels(dataset) if stratify and members is None else None
    n = len(members) if members is not None else len(dataset)  # type: ignore[arg-type]
    if folds is not None:
        rest, test_idx = split_indices(n, [test], seed, labels)
        tr, va = kfold_indices(len(rest), folds, fold, seed, labels[rest] if labels is not None else None)
        train_idx, val_idx = rest[tr], rest[va]
    else:
        train_idx, val_idx, test_idx = split_indices(n, [val, test], seed, labels)
    if members is not None:  # query positions -> their items
        train_idx, val_idx, test_idx = (_items_of(members, part) for part in (train_idx, val_idx, test_idx))
    train = Subset(dataset, train_idx.tolist())
    return (
        train,
        Subset(dataset, val_idx.tolist()) if len(val_idx) else None,
        Subset(dataset, test_idx.tolist()) if len(test_idx) else None,
    )


def _items_of(members: list[np.ndarray], queries: np.ndarray) -> np.ndarray:
    if not len(queries):
        return np.array([], dtype=np.int64)
    return np.sort(np.concatenate([members[q] for q in queries]))
