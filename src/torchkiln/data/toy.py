"""The digits images relabelled for every task kind: small real data for tests, examples and demos."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from torchkiln.data.digits import Digits
from torchkiln.registry import DATASETS


@DATASETS.register
class DigitsMultiLabel(Dataset):
    """Two yes/no labels per digit image: [odd, at least 5]."""

    classes = ["odd", "ge5"]
    num_classes = 2

    def __init__(self, flatten: bool = False):
        base = Digits(flatten=flatten)
        self.images = base.images
        d = base.targets
        self.targets = torch.stack([d % 2, (d >= 5).long()], dim=1).float()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]


@DATASETS.register
class DigitsRegression(Dataset):
    """Predict the digit's value as a real number (targets are float, shape (N,))."""

    def __init__(self, flatten: bool = False):
        base = Digits(flatten=flatten)
        self.images = base.images
        self.targets = base.targets.float()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]


@DATASETS.register
class DigitsMultiHead(Dataset):
    """Three heads from one digit d, in the face-mask shape: d % 3 (3), d % 2 (2), d // 4 (3).

    Targets are (N, 3) class indices; with the heads in this order the combined class is
    h0*6 + h1*3 + h2 (18 classes, of which the ten digits reach ten).
    """

    heads = {"mod3": 3, "parity": 2, "quarter": 3}

    def __init__(self, flatten: bool = False):
        base = Digits(flatten=flatten)
        self.images = base.images
        d = base.targets
        self.targets = torch.stack([d % 3, d % 2, d // 4], dim=1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]


@DATASETS.register
class DigitsRanking(Dataset):
    """Lists of digit images ranked by value: relevance 2 for 8-9, 1 for 5-7, 0 below.

    Each query holds `items` random images; every `no_relevant`-th query holds only images
    below 5 (nothing relevant). A sample is (image, relevance, query id); `flatten` as in Digits.
    """

    def __init__(self, queries: int = 150, items: int = 12, no_relevant: int = 10, seed: int = 0,
                 flatten: bool = False):
        base = Digits(flatten=flatten)
        g = torch.Generator().manual_seed(seed)
        low = torch.nonzero(base.targets < 5).squeeze(1)
        picks, qid = [], []
        for q in range(queries):
            empty = no_relevant and q % no_relevant == no_relevant - 1
            pool = low if empty else torch.arange(len(base.targets))
            picks.append(pool[torch.randperm(len(pool), generator=g)[:items]])
            qid.append(torch.full((items,), q, dtype=torch.long))
        idx = torch.cat(picks)
        d = base.targets[idx]
        self.inputs = base.images[idx]
        self.relevance = torch.where(d >= 8, 2.0, torch.where(d >= 5, 1.0, 0.0))
        self.groups = torch.cat(qid)

    def fast_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inputs, self.relevance, self.groups

    def __len__(self) -> int:
        return len(self.relevance)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.relevance[index], self.groups[index]
