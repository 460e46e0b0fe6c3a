"""What a logger may ask to see of validation: predictions, targets, a few misclassified inputs.

The trainer builds a `ValidationCollector` only in epochs where some logger asks for one, feeds it
every validation batch, and hands its `ValidationSample`s (one per classification view: the classes,
or each head and the combined class of a multi-head task) to those loggers. Predictions stay on the
device until the end of validation (one transfer); misclassified inputs are copied out only until
`max_images` of them are held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchkiln.tasks.base import ReportView, single_label_views


@dataclass
class ValidationSample:
    """One classification view (the task's classes, or a head of a multi-head task) over the whole
    validation set, on the CPU."""

    preds: torch.Tensor  # (N,) int64
    targets: torch.Tensor  # (N,) int64
    num_classes: int
    images: torch.Tensor | None = None  # (K, C, H, W) float: misclassified inputs, K <= max_images
    image_preds: torch.Tensor | None = None  # (K,)
    image_targets: torch.Tensor | None = None  # (K,)
    view: str = ""  # "" for the task's own classes; a head's name ("mask") or the combined class
    class_names: list[str] | None = None  # the view's own names (a head's `names`), when it has them

    def confusion(self) -> torch.Tensor:
        """(C, C) counts; rows are true classes, columns predicted ones. Targets outside the classes
        (a loss's ignore_index) are left out."""
        from torchkiln.metrics.confusion import confusion_matrix

        return confusion_matrix(self.preds, self.targets, self.num_classes)


@dataclass
class BoxSample:
    """A few validation images with their predicted and true boxes (detection), on the CPU, for the
    loggers that draw them (TensorBoard)."""

    images: list[torch.Tensor]  # (C, H, W) float in [0, 1], as the model saw them
    predicted: list[dict[str, torch.Tensor]]  # boxes (N, 4) XYXY, labels, scores
    true: list[dict[str, torch.Tensor]]  # boxes (K, 4) XYXY, labels
    view: str = "boxes"


def as_images(inputs: Any) -> torch.Tensor | None:
    """(N, C, H, W) with C in 1 or 3 (or (N, H, W)), else None: only image inputs are drawn."""
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        return None
    if inputs.dim() == 3:
        inputs = inputs.unsqueeze(1)
    if inputs.dim() != 4 or inputs.shape[1] not in (1, 3) or min(inputs.shape[2:]) < 4:
        return None
    return inputs


Views = Callable[[Any, Any], list[ReportView]]
Boxes = Callable[[Any, Any], "tuple[list[dict[str, Any]], list[dict[str, Any]]] | None"]


class _ViewParts:
    """What the collector holds of one view until the end of validation."""

    def __init__(self, view: ReportView):
        self.num_classes, self.class_names = view.num_classes, view.class_names
        self.preds: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.images: list[torch.Tensor] = []
        self.image_preds: list[torch.Tensor] = []
        self.image_targets: list[torch.Tensor] = []
        self.held = 0

    def sample(self, name: str) -> ValidationSample:
        sample = ValidationSample(preds=torch.cat(self.preds).cpu().long(), targets=torch.cat(self.targets).cpu().long(),
                                  num_classes=self.num_classes, view=name, class_names=self.class_names)
        if self.images:
            sample.images = torch.cat(self.images)
            sample.image_preds = torch.cat(self.image_preds).long()
            sample.image_targets = torch.cat(self.image_targets).long()
        return sample


class ValidationCollector:
    """Fed (inputs, outputs, targets) per validation batch. `views` (the task's `validation_views`)
    turns a batch into its classification views: one for single-label classification, one per head
    and the combined class for a multi-head task; a batch with none (regression, multi-label) ends
    the collection. Each view keeps up to `max_images` of its own misclassified inputs."""

    def __init__(self, max_images: int = 0, views: Views | None = None, boxes: Boxes | None = None):
        self.max_images = max(0, int(max_images))
        self.views = views or single_label_views
        self.boxes = boxes  # a detection task's (predicted, true) boxes per image: a BoxSample instead
        self.usable = True
        self._parts: dict[str, _ViewParts] = {}
        self._boxes: BoxSample | None = None

    @classmethod
    def of(cls, task: Any, max_images: int) -> ValidationCollector:
        """The collector for `task`'s outputs: its classification views, or its boxes."""
        return cls(max_images, task.validation_views, task.validation_boxes)

    def _add_boxes(self, inputs: Any, outputs: Any, targets: Any) -> bool:
        """Keep the first `max_images` images with their boxes; False when the task gives none."""
        if self._boxes is not None and len(self._boxes.images) >= self.max_images:
            return True
        pair = self.boxes(outputs, targets) if self.boxes is not None and targets is not None else None
        if pair is None or not isinstance(inputs, (list, tuple)):
            return False
        held = self._boxes or BoxSample([], [], [])
        self._boxes = held
        for image, pred, true in zip(inputs, *pair):
            if len(held.images) >= self.max_images:
                break
            held.images.append(image.detach().float().cpu())
            held.predicted.append({k: v.detach().cpu() for k, v in pred.items()})
            held.true.append({k: v.detach().cpu() for k, v in true.items()})
        return True

    def update(self, inputs: Any, outputs: Any, targets: Any) -> None:
        if not self.usable or (self.max_images and self._add_boxes(inputs, outputs, targets)):
            return
        views = [v for v in self.views(outputs, targets) if _drawable(v)] if targets is not None else []
        if not views or (self._parts and [v.name for v in views] != list(self._parts)):
            self.usable = False  # not classification: nothing to draw
            return
        images = as_images(inputs) if self.max_images else None
        for view in views:
            parts = self._parts.setdefault(view.name, _ViewParts(view))
            parts.preds.append(view.preds)
            parts.targets.append(view.targets)
            if images is None or parts.held >= self.max_images:
                continue
            wrong = (view.preds != view.targets).nonzero().squeeze(1)[: self.max_images - parts.held]
            if wrong.numel():
                parts.images.append(images[wrong].float().cpu())
                parts.image_preds.append(view.preds[wrong].cpu())
                parts.image_targets.append(view.targets[wrong].cpu())
                parts.held += int(wrong.numel())

    def result(self) -> list[ValidationSample]:
        """One sample per view, in the task's order (a detection task: one BoxSample); none when the
        outputs were neither classification nor boxes."""
        if self._boxes is not None:
            return [self._boxes]
        if not self.usable:
            return []
        return [parts.sample(name) for name, parts in self._parts.items()]


def _drawable(view: ReportView) -> bool:
    p, t = view.preds, view.targets
    return (view.kind == "multiclass" and isinstance(p, torch.Tensor) and isinstance(t, torch.Tensor)
            and p.dim() == 1 and t.dim() == 1 and len(p) == len(t) and not t.is_floating_point())


def merge_samples(samples: list[list[ValidationSample]], max_images: int) -> list[ValidationSample]:
    """One sample per view from several ranks' shards (predictions concatenated, images up to max_images)."""
    by_view: dict[str, list[ValidationSample]] = {}
    boxes = [s for rank_samples in samples for s in rank_samples or [] if isinstance(s, BoxSample)]
    if boxes:
        return [BoxSample(*(sum((getattr(b, k) for b in boxes), [])[:max_images]
                            for k in ("images", "predicted", "true")))]
    for rank_samples in samples:
        for s in rank_samples or []:
            by_view.setdefault(s.view, []).append(s)
    return [_merge(parts, max_images) for parts in by_view.values()]


def _merge(parts: list[ValidationSample], max_images: int) -> ValidationSample:
    merged = ValidationSample(
        preds=torch.cat([s.preds for s in parts]),
        targets=torch.cat([s.targets for s in parts]),
        num_classes=parts[0].num_classes,
        view=parts[0].view,
        class_names=parts[0].class_names,
    )
    with_images = [s for s in parts if s.images is not None]
    if with_images and max_images > 0:
        merged.images = torch.cat([s.images for s in with_images])[:max_images]
        merged.image_preds = torch.cat([s.image_preds for s in with_images])[:max_images]
        merged.image_targets = torch.cat([s.image_targets for s in with_images])[:max_images]
    return merged
