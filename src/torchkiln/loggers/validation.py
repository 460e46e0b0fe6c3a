"""What a logger may ask to see of validation: predictions, targets, a few misclassified inputs.

The trainer builds a `ValidationCollector` only in epochs where some logger asks for one, feeds it
every validation batch, and hands its `ValidationSample` to those loggers. Predictions stay on the
device until the end of validation (one transfer); misclassified inputs are copied out only until
`max_images` of them are held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ValidationSample:
    """Single-label classification results over the whole validation set, on the CPU."""

    preds: torch.Tensor  # (N,) int64
    targets: torch.Tensor  # (N,) int64
    num_classes: int
    images: torch.Tensor | None = None  # (K, C, H, W) float: misclassified inputs, K <= max_images
    image_preds: torch.Tensor | None = None  # (K,)
    image_targets: torch.Tensor | None = None  # (K,)

    def confusion(self) -> torch.Tensor:
        """(C, C) counts; rows are true classes, columns predicted ones."""
        c = self.num_classes
        index = self.targets * c + self.preds
        return torch.bincount(index, minlength=c * c).reshape(c, c)


def as_images(inputs: Any) -> torch.Tensor | None:
    """(N, C, H, W) with C in 1 or 3 (or (N, H, W)), else None: only image inputs are drawn."""
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        return None
    if inputs.dim() == 3:
        inputs = inputs.unsqueeze(1)
    if inputs.dim() != 4 or inputs.shape[1] not in (1, 3) or min(inputs.shape[2:]) < 4:
        return None
    return inputs


class ValidationCollector:
    """Fed (inputs, outputs, targets) per validation batch; gives up on anything not classification."""

    def __init__(self, max_images: int = 0):
        self.max_images = max(0, int(max_images))
        self.usable = True
        self._preds: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._images: list[torch.Tensor] = []
        self._image_preds: list[torch.Tensor] = []
        self._image_targets: list[torch.Tensor] = []
        self._held = 0
        self._num_classes = 0

    def update(self, inputs: Any, outputs: Any, targets: Any) -> None:
        if not self.usable:
            return
        if (not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor)
                or outputs.dim() != 2 or targets.dim() != 1 or targets.is_floating_point()
                or outputs.shape[0] != targets.shape[0]):
            self.usable = False  # not single-label classification: nothing to draw
            return
        self._num_classes = int(outputs.shape[1])
        preds = outputs.argmax(dim=1)
        self._preds.append(preds)
        self._targets.append(targets)
        if self._held < self.max_images:
            images = as_images(inputs)
            if images is None:
                self.max_images = 0
                return
            wrong = (preds != targets).nonzero().squeeze(1)[: self.max_images - self._held]
            if wrong.numel():
                self._images.append(images[wrong].float().cpu())
                self._image_preds.append(preds[wrong].cpu())
                self._image_targets.append(targets[wrong].cpu())
                self._held += int(wrong.numel())

    def result(self) -> ValidationSample | None:
        if not self.usable or not self._preds:
            return None
        sample = ValidationSample(
            preds=torch.cat(self._preds).cpu().long(),
            targets=torch.cat(self._targets).cpu().long(),
            num_classes=self._num_classes,
        )
        if self._images:
            sample.images = torch.cat(self._images)
            sample.image_preds = torch.cat(self._image_preds).long()
            sample.image_targets = torch.cat(self._image_targets).long()
        return sample


def merge_samples(samples: list[ValidationSample | None], max_images: int) -> ValidationSample | None:
    """One sample from several ranks' shards (predictions concatenated, images up to max_images)."""
    parts = [s for s in samples if s is not None]
    if not parts:
        return None
    merged = ValidationSample(
        preds=torch.cat([s.preds for s in parts]),
        targets=torch.cat([s.targets for s in parts]),
        num_classes=parts[0].num_classes,
    )
    with_images = [s for s in parts if s.images is not None]
    if with_images and max_images > 0:
        merged.images = torch.cat([s.images for s in with_images])[:max_images]
        merged.image_preds = torch.cat([s.image_preds for s in with_images])[:max_images]
        merged.image_targets = torch.cat([s.image_targets for s in with_images])[:max_images]
    return merged
