"""scikit-learn's bundled 8x8 digits: real images, no download."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from torchkiln.registry import DATASETS


@DATASETS.register
class Digits(Dataset):
    """1797 grayscale 8x8 digits as (1, 8, 8) float tensors in [0, 1] and int64 labels.

    `classes` keeps only those digits (e.g. [0, 1, 2, 3, 4]); labels are then renumbered 0..k-1
    unless `relabel` is false. `size` resizes the images (bilinear), e.g. 32 for ImageNet backbones.
    """

    num_classes: int

    def __init__(self, classes: list[int] | None = None, relabel: bool = True, flatten: bool = False,
                 size: int | None = None):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
        labels = torch.as_tensor(bunch.target, dtype=torch.int64)
        if classes is not None:
            keep = torch.isin(labels, torch.as_tensor(classes))
            images, labels = images[keep], labels[keep]
            if relabel:
                lookup = {c: i for i, c in enumerate(sorted(classes))}
                labels = torch.as_tensor([lookup[int(v)] for v in labels], dtype=torch.int64)
        if size is not None and size != images.shape[-1]:
            images = torch.nn.functional.interpolate(images.unsqueeze(1), size=(size, size), mode="bilinear",
                                                     align_corners=False).squeeze(1)
        self.images = images.reshape(len(images), -1) if flatten else images.unsqueeze(1)
        self.targets = labels
        self.num_classes = int(labels.max()) + 1 if relabel or classes is None else 10
        self.classes = [str(c) for c in (sorted(classes) if classes is not None else range(10))]

    def fast_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows are samples: the fast path batches by `t[idx]` instead of __getitem__ + collate."""
        return self.images, self.targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]
