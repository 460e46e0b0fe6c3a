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
    """Queries over digit images: query q asks for digit q; relevance 2 for digit q, 1 for q+1, else 0.

    Each query holds `items` images (at least one of digit q, except every `no_relevant`-th query,
    which holds none); a sample is (image flattened ++ one-hot(q), relevance, query id).
    """

    def __init__(self, queries: int = 150, items: int = 12, no_relevant: int = 10, seed: int = 0):
        base = Digits(flatten=True)
        g = torch.Generator().manual_seed(seed)
        by_digit = [torch.nonzero(base.targets == d).squeeze(1) for d in range(10)]
        feats, rel, qid = [], [], []
        for q in range(queries):
            digit = int(torch.randint(10, (1,), generator=g))
            pool = torch.randperm(len(base.targets), generator=g)
            pool = pool[base.targets[pool] != digit] if no_relevant and q % no_relevant == no_relevant - 1 else pool
            picks = pool[:items]
            if not (no_relevant and q % no_relevant == no_relevant - 1):
                own = by_digit[digit][torch.randint(len(by_digit[digit]), (1,), generator=g)]
                picks = torch.cat([own, picks[: items - 1]])
            d = base.targets[picks]
            onehot = torch.zeros(len(picks), 10)
            onehot[:, digit] = 1.0
            feats.append(torch.cat([base.images[picks], onehot], dim=1))
            rel.append(torch.where(d == digit, 2.0, torch.where(d == (digit + 1) % 10, 1.0, 0.0)))
            qid.append(torch.full((len(picks),), q, dtype=torch.long))
        self.inputs = torch.cat(feats)
        self.relevance = torch.cat(rel)
        self.groups = torch.cat(qid)
        self.in_features = self.inputs.shape[1]

    def __len__(self) -> int:
        return len(self.relevance)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.relevance[index], self.groups[index]
