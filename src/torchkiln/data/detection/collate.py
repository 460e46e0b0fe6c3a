"""The detection collate: images and targets stay lists (each image has its own number of boxes,
and torchvision's detectors take lists of (C, H, W) images of any size)."""

from __future__ import annotations

from typing import Any

from torchkiln.data.collate import COLLATES


@COLLATES.register(name="detection")
class DetectionCollate:
    """[(image, target), ...] -> (list of images, list of target dicts)."""

    def __call__(self, batch: list[Any]) -> tuple[list[Any], list[dict[str, Any]]]:
        images = [sample[0] for sample in batch]
        targets = [sample[1] for sample in batch]
        return images, targets
