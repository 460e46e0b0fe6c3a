"""Box-aware transforms: the config's torchvision.transforms.v2 steps applied to (image, target)
together, so flips, resizes and crops move the boxes with the pixels, then SanitizeBoundingBoxes,
so that no box of zero size (or cropped away) reaches a detector."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset


def is_detection(dataset: Any) -> bool:
    """Whether `dataset` (under Subsets and wrappers) is a detection data set."""
    from torchkiln.data.wrappers import unwrap

    inner, _ = unwrap(dataset, lambda ds: bool(getattr(ds, "detection", False)))
    return bool(getattr(inner, "detection", False))


def build_box_pipeline(steps: list[Any], where: str, min_size: float = 1.0) -> Callable:
    """The steps, uint8 -> float32 in [0, 1], then SanitizeBoundingBoxes(min_size)."""
    from torchvision.transforms import v2

    from torchkiln.data.transforms import build_pipeline

    pipeline = build_pipeline(steps, where, to_float=True, boxes=True)
    sanitize = v2.SanitizeBoundingBoxes(min_size=min_size, labels_getter=lambda sample: sample[1]["labels"])
    return v2.Compose([pipeline, sanitize])


class BoxTransformed(Dataset):
    """Apply `transform` to each (image, target) sample; the image comes out a plain float tensor."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.transform(self.dataset[index])
        target = {**target, "boxes": target["boxes"].as_subclass(torch.Tensor).float()}
        return image.as_subclass(torch.Tensor), target
