"""Object detection with torchvision's detectors: a batch is (list of images, list of targets
{boxes (K, 4) XYXY, labels (K,)}); in train mode the model takes the targets and returns its loss
components; in eval mode it returns detections, and the same components are computed too (with
BatchNorm and dropout kept in eval mode), so validation logs the losses beside mAP.

The loss is the sum of the components (`task.args.loss_weights` weighs them by name, e.g.
{loss_classifier: 2.0}). Metrics: map, map_50, map_75, mar_100, each class's AP
(`ap_per_class/<i>`, class i + 1) and the loss components (`loss/<name>`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchkiln.errors import ConfigError
from torchkiln.registry import TASKS
from torchkiln.tasks.base import Task, dict_input

METRIC_NAMES = ("map", "map_50", "map_75", "mar_100", "ap_per_class")


class DetectionLoss(nn.Module):
    """sum over the detector's loss components of weight(name) * component (weights default 1)."""

    def __init__(self, weights: dict[str, float] | None = None):
        super().__init__()
        self.weights = dict(weights or {})

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights.get(k, 1.0) * v for k, v in losses.items())  # type: ignore[return-value]


def eval_losses(model: nn.Module, images: list[torch.Tensor], targets: list[dict[str, Any]]
                ) -> dict[str, torch.Tensor]:
    """The loss components of an eval-mode detector: train mode for the detector's own branches,
    eval mode kept for BatchNorm and dropout (no statistics move); modes restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            m.eval()
    try:
        return model(images, targets)
    finally:
        for m, training in modes:
            m.training = training


def to_stored_pixels(detections: list[dict[str, Any]], images: list[torch.Tensor], sizes: torch.Tensor
                     ) -> list[dict[str, Any]]:
    """Boxes from the transformed image's pixels to the stored image's ((H, W) per image in `sizes`)."""
    out = []
    for det, image, (h, w) in zip(detections, images, sizes.tolist(), strict=True):
        sx, sy = w / image.shape[-1], h / image.shape[-2]
        scale = torch.tensor([sx, sy, sx, sy], dtype=det["boxes"].dtype, device=det["boxes"].device)
        out.append({**det, "boxes": det["boxes"] * scale})
    return out


def _boxes_labels(items: list[dict[str, Any]], scores: bool = False) -> list[dict[str, torch.Tensor]]:
    keys = ("boxes", "labels", "scores") if scores else ("boxes", "labels")
    return [{k: d[k].detach() for k in keys} for d in items]


@TASKS.register(name="detection")
class DetectionTask(Task):
    name = "detection"
    metric_kind = "detection"
    concat_metric_updates = False
    stacks_inputs = False  # kiln predict's images stay a list (any sizes)

    def __init__(self, loss_weights: dict[str, float] | None = None):
        self.loss_weights = dict(loss_weights or {})

    def split_batch(self, batch: Any) -> tuple[Any, Any]:
        if isinstance(batch, dict):  # kiln predict's inputs: images, no targets
            return list(dict_input(batch)), batch.get("target")
        images, targets = batch[0], batch[1] if len(batch) > 1 else None
        return images, targets

    def forward(self, model: nn.Module, batch: Any) -> tuple[dict[str, Any], Any]:
        images, targets = self.split_batch(batch)
        if model.training:
            return {"losses": model(images, targets)}, targets
        detections = model(images)
        if isinstance(batch, dict) and batch.get("size") is not None:
            detections = to_stored_pixels(detections, images, batch["size"])
        if targets is None:
            return {"detections": detections}, None
        return {"detections": detections, "losses": eval_losses(model, images, targets)}, targets

    def use_tta(self, tta: Any) -> None:
        if tta is not None:
            raise ConfigError(f"--tta {tta.name}: a detection run's boxes cannot be averaged over views;"
                              " leave --tta out (or --tta none)")

    def scores(self, outputs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """One dict per image: boxes (N, 4) XYXY, labels (N,) in 1..C, scores (N,)."""
        return outputs["detections"]

    def prediction_writer(self, options: Any) -> Any:
        from torchkiln.tasks.predictions import DetectionWriter

        return DetectionWriter(options)

    def loss(self, loss_fn: nn.Module, outputs: dict[str, Any], targets: Any) -> torch.Tensor:
        return loss_fn(outputs["losses"])

    def update_metrics(self, metrics: Any, outputs: dict[str, Any], targets: Any) -> None:
        from torchkiln.metrics.detection import LossParts, MeanAP

        detections = outputs.get("detections")
        for _, metric in metrics.items(keep_base=True):
            if isinstance(metric, LossParts):
                metric.update(outputs["losses"], len(targets))
            elif detections is not None and isinstance(metric, MeanAP):
                metric.update(_boxes_labels(detections, scores=True), _boxes_labels(targets))
            elif detections is not None:
                metric.update()

    def predict(self, outputs: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        return outputs["detections"]

    def batch_size(self, batch: Any) -> int:
        return len(batch[0])

    # -- building --------------------------------------------------------------------------
    def build_metrics(self, specs: list[Any], num_classes: int | None):
        from torchkiln.metrics.base import MetricSet
        from torchkiln.metrics.detection import detection_metrics

        for i, spec in enumerate(specs):
            name = spec if isinstance(spec, str) else spec.get("type", spec.get("name"))
            if name not in METRIC_NAMES:
                raise ConfigError(f"metrics.{i}: '{name}' is not a detection metric; the detection task"
                                  f" logs {', '.join(METRIC_NAMES)} and its loss components (leave metrics out)")
        self.metric_order = ["map_50", "map", "map_75", "mar_100"]
        return MetricSet(detection_metrics(num_classes))

    def make_loss(self, specs: list[dict[str, Any]] | None, labels: Any = None,
                  num_classes: int | None = None) -> nn.Module:
        if specs:
            raise ConfigError("loss: a torchvision detector computes its own loss components; leave loss out"
                              " (weigh the components with task.args.loss_weights)")
        return DetectionLoss(self.loss_weights)

    def check_class_names(self, class_names: Any) -> None:
        if not class_names:
            raise ConfigError("data.dataset: the detection task needs a detection data set (COCODetection,"
                              " CSVBoxes, ShapesDetection) with at least one category")

    def default_monitor(self, metric_names: list[str], has_val: bool) -> str:
        return "val/map_50" if has_val else "train/loss"

    def monitor_mode(self, monitor: str) -> str:
        return "min" if "loss" in monitor else "max"

    def validation_views(self, outputs: Any, targets: Any) -> list:
        return []

    def validation_boxes(self, outputs: Any, targets: Any) -> tuple[list[dict], list[dict]] | None:
        return _boxes_labels(outputs["detections"], scores=True), _boxes_labels(targets)

    def report_table(self, results: dict[str, float], class_names: list[str] | None, split: str) -> str | None:
        """`kiln test`'s per-class AP table (IoU 0.50:0.95; -1 for a class without objects)."""
        prefix = f"{split}/ap_per_class/"
        values = {int(k[len(prefix):]): v for k, v in results.items() if k.startswith(prefix)}
        if not values:
            return None
        names = [class_names[i] if class_names and i < len(class_names) else str(i + 1) for i in sorted(values)]
        width = max(len("class"), *(len(n) for n in names))
        lines = [f"{'class':<{width}}  AP@[.50:.95]"]
        lines += [f"{n:<{width}}  {values[i]:.4f}" for n, i in zip(names, sorted(values))]
        lines.append(f"{'mean':<{width}}  {results.get(f'{split}/map', float('nan')):.4f}")
        return "\n".join(lines) + "\n"
