"""data/wrappers.py's unwrap(): the one walk through Subsets and wrappers, and its readers."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from torchkiln.data.normalize import Standardized
from torchkiln.data.splits import dataset_labels
from torchkiln.data.stats import compute_stats
from torchkiln.data.targets import dataset_targets
from torchkiln.data.transforms import Transformed
from torchkiln.data.wrappers import class_names_of, has_attr, unwrap


class Labelled(Dataset):
    """Eight samples with stored single labels, a label matrix (multilabel) and class names."""

    classes = ["a", "b", "c"]

    def __init__(self) -> None:
        self.targets = np.array([0, 1, 2, 0, 1, 2, 0, 1])
        self.label_matrix = np.eye(3, dtype=np.int64)[self.targets]

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.full((3,), float(i)), int(self.targets[i])


def test_unwrap_composes_subset_indices_through_wrappers():
    base = Labelled()
    wrapped = Subset(Transformed(Subset(base, [7, 5, 3, 1, 0]), None), [4, 1, 2])
    inner, index = unwrap(wrapped)
    assert inner is base and index.tolist() == [0, 5, 3]
    assert unwrap(wrapped, wrappers=False)[0].__class__ is Transformed
    assert unwrap(base) == (base, None)
    std = Standardized(base, torch.zeros(3), torch.ones(3))
    assert unwrap(std, has_attr("mean"))[0] is std


def test_every_reader_sees_through_subsets_and_transform_wrappers():
    base = Labelled()
    ds = Transformed(Subset(base, [2, 1, 0, 3]), None)
    assert dataset_labels(ds).tolist() == [2, 1, 0, 0]
    assert dataset_targets(ds).tolist() == [2, 1, 0, 0]
    assert class_names_of(ds) == ["a", "b", "c"]


def test_stats_read_the_label_matrix_through_a_transform_wrapper():
    """The label matrix reader used to look through Subsets only: a transformed multilabel split
    had no class counts."""

    class MultiLabel(Labelled):

        def __init__(self) -> None:
            super().__init__()
            self.targets = None

        def __getitem__(self, i: int):
            return torch.full((3,), float(i)), torch.as_tensor(self.label_matrix[i])

    stats = compute_stats(Transformed(Subset(MultiLabel(), [0, 1, 2, 3]), None), ["a", "b", "c"])
    assert stats["class_counts"] == {"a": 2, "b": 1, "c": 1}
