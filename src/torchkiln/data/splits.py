"""Seeded, optionally stratified train/val/test splits."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset, Subset

from torchkiln.errors import DataError


def dataset_labels(dataset: Dataset) -> np.ndarray | None:
    """Class labels without decoding samples, when the dataset exposes them (`targets`)."""
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None:
            return np.asarray(values)
    return None


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
    dataset: Dataset, val: float, test: float, seed: int, stratify: bool = True
) -> tuple[Subset, Subset | None, Subset | None]:
    labels = dataset_labels(dataset) if stratify else None
    train_idx, val_idx, test_idx = split_indices(len(dataset), [val, test], seed, labels)
    train = Subset(dataset, train_idx.tolist())
    return (
        train,
        Subset(dataset, val_idx.tolist()) if len(val_idx) else None,
        Subset(dataset, test_idx.tolist()) if len(test_idx) else None,
    )
