"""A task turns a batch into (outputs, targets), a loss, and metric updates. Subclass for your own.

Hooks a subclass may override, all with working defaults:
  split_batch / forward / loss / update_metrics / predict   the step
  build_metrics(specs, num_classes)                         metrics (keys are the logged names)
  make_loss(specs, labels, num_classes)                     the loss module from config specs
  num_outputs(num_classes)                                  the model's output width
  check_class_names(class_names)                            the dataset's classes fit the task
  default_monitor(metric_names, has_val)                    what `trainer.monitor` is when unset
  report_views(outputs, targets, class_names)               per-class tables for `kiln test`
  report_table(results, class_names, split)                 or a table of its own from the results
  validation_views(outputs, targets)                        what validation pictures draw
  validation_boxes(outputs, targets)                        or the boxes they draw (detection)
  scores / outputs_from_scores / prediction_writer          predictions and test-time augmentation
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchkiln.errors import DataError
from torchkiln.registry import TASKS


@dataclass
class ReportView:
    """Predictions and targets of one classification view (a head, the combined class, ...)."""

    name: str
    kind: str  # "multiclass" (class indices) or "multilabel" (0/1 per label)
    preds: torch.Tensor
    targets: torch.Tensor
    num_classes: int
    class_names: list[str] | None = None


class Task:
    """Supervised default: a batch is (inputs, targets) or {input, target}; outputs = model(inputs)."""

    name = "task"
    default_loss = "MSELoss"
    default_metrics: tuple[str, ...] = ()
    metric_kind = "regression"
    # True when one metric update over k batches concatenated equals k updates (per-sample
    # metrics): the trainer then updates once per few batches (engine/metric_buffer.py).
    concat_metric_updates = False
    lower_is_better = frozenset({"loss", "mae", "mse", "rmse", "hamming_loss"})
    stacks_inputs = True  # kiln predict stacks a batch's inputs into one tensor (False: a list)

    def split_batch(self, batch: Any) -> tuple[Any, Any]:
        if isinstance(batch, dict):
            return dict_input(batch), batch.get("target")
        inputs, targets = batch[0], batch[1] if len(batch) > 1 else None
        return inputs, targets

    tta: Any = None  # test-time augmentation (inference/tta.py), set with use_tta

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, Any]:
        inputs, targets = self.split_batch(batch)
        return (model(inputs) if self.tta is None else self.tta(model, inputs, self)), targets

    def use_tta(self, tta: Any) -> None:
        """Outputs become the mean of `tta`'s views' scores (as outputs); None: the plain forward."""
        self.tta = tta

    def loss(self, loss_fn: nn.Module, outputs: Any, targets: Any) -> torch.Tensor:
        return loss_fn(outputs, need_targets(targets))

    def update_metrics(self, metrics: Any, outputs: Any, targets: Any) -> None:
        metrics.update(outputs.detach().float(), targets)

    def predict(self, outputs: Any) -> Any:
        return outputs

    # -- predictions -----------------------------------------------------------------------
    def scores(self, outputs: Any) -> Any:
        """What a prediction reads and test-time augmentation averages (probabilities, values)."""
        return outputs.float()

    def outputs_from_scores(self, scores: Any) -> Any:
        """Outputs whose scores are `scores` (so loss, metrics and predictions read averaged views)."""
        return scores

    def prediction_writer(self, options: Any) -> Any:
        """The rows of a prediction file (tasks/predictions.py): one value or row of values per input."""
        from torchkiln.tasks.predictions import PredictionWriter

        return PredictionWriter(options)

    def batch_size(self, batch: Any) -> int:
        inputs, _ = self.split_batch(batch)
        while isinstance(inputs, (list, tuple, dict)):
            inputs = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
        return int(inputs.shape[0])

    # -- building --------------------------------------------------------------------------
    def build_metrics(self, specs: list[Any], num_classes: int | None):
        from torchkiln.metrics import MetricSet, metric_dict

        metrics = metric_dict(list(specs) or list(self.default_metrics), num_classes, kind=self.metric_kind,
                              threshold=getattr(self, "threshold", 0.5))
        self.metric_order = list(metrics)  # as listed
        return MetricSet(metrics)

    def make_loss(self, specs: list[dict[str, Any]] | None, labels: Callable[[], torch.Tensor] | None = None,
                  num_classes: int | None = None) -> nn.Module:
        """specs: [{type, args, weight}] from the config, or None for the task's default loss."""
        from torchkiln.losses import from_specs

        return from_specs(specs or [{"type": self.default_loss}], "loss", labels, num_classes)

    def num_outputs(self, num_classes: int | None) -> int | None:
        return num_classes

    def check_class_names(self, class_names: Any) -> None:
        """Refuse, before training, a dataset whose classes cannot be this task's (a one-line error)."""

    # -- monitoring ------------------------------------------------------------------------
    def default_monitor(self, metric_names: list[str], has_val: bool) -> str:
        """The first scalar metric listed (on val when there is one), else the loss."""
        from torchkiln.metrics import is_scalar_name

        split = "val" if has_val else "train"
        for name in self._monitor_order(metric_names):
            if is_scalar_name(name):
                return f"{split}/{name}"
        return f"{split}/loss"

    def _monitor_order(self, metric_names: list[str]) -> list[str]:
        order = getattr(self, "metric_order", [])
        return sorted(metric_names, key=lambda n: order.index(n) if n in order else len(order))

    def monitor_mode(self, monitor: str) -> str:
        last = monitor.rsplit("/", 1)[-1].split("@", 1)[0]
        return "min" if "loss" in last or last in self.lower_is_better else "max"

    # -- reports ---------------------------------------------------------------------------
    def report_views(self, outputs: Any, targets: Any, class_names: list[str] | None = None) -> list[ReportView]:
        return []

    def report_table(self, results: dict[str, float], class_names: list[str] | None, split: str) -> str | None:
        """A task's own `kiln test` table from the split's results (detection: per-class AP), or None."""
        return None

    def validation_views(self, outputs: Any, targets: Any) -> list[ReportView]:
        """The classification views drawn in validation pictures (confusion matrix, misclassified
        inputs) for one batch; none when the outputs are not single-label classification."""
        return single_label_views(outputs, targets)

    def validation_boxes(self, outputs: Any, targets: Any) -> tuple[list[dict], list[dict]] | None:
        """(predicted, true) boxes per image for the validation pictures (detection); None: no boxes."""
        return None


def dict_input(batch: dict[str, Any], expected: str = "'input' and 'target'") -> Any:
    """A dict batch's inputs; a batch without the key `input` is refused, naming the keys it has."""
    try:
        return batch["input"]
    except KeyError:
        raise DataError(f"a dict batch needs the keys {expected}; this one has {', '.join(map(repr, batch))}:"
                        " rename them in the dataset's __getitem__, or return (input, target)") from None


def need_targets(targets: Any) -> Any:
    """Training's loss needs targets (evaluate and predict go on without them)."""
    if targets is None:
        raise DataError("the loss needs targets and this batch has none: a dict batch needs the key 'target'"
                        " (beside 'input'), a tuple batch is (input, target)")
    return targets


def single_label_views(outputs: Any, targets: Any) -> list[ReportView]:
    """One view when outputs are (N, C) logits and targets (N,) class indices, else none."""
    if (not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor)
            or outputs.dim() != 2 or targets.dim() != 1 or targets.is_floating_point()
            or outputs.shape[0] != targets.shape[0]):
        return []
    return [ReportView("", "multiclass", outputs.argmax(dim=1), targets, int(outputs.shape[1]))]


@TASKS.register(name="classification")
class ClassificationTask(Task):
    """Single-label classification over C classes; outputs are logits (N, C)."""

    name = "classification"
    default_loss = "CrossEntropyLoss"
    default_metrics = ("accuracy", "f1_macro")
    metric_kind = "multiclass"
    concat_metric_updates = True

    def update_metrics(self, metrics: Any, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        # Confusion-matrix metrics get the predicted labels (one argmax for all of them); the others
        # probabilities, not logits: torchmetrics decides per batch whether to softmax otherwise.
        from torchkiln.metrics.confusion import ConfusionMetric

        outputs = outputs.detach()
        if targets.is_floating_point() and targets.dim() == 2:  # soft targets (data.mixup): the dominant label
            targets = targets.argmax(dim=1)
        labels = probs = None
        for metric in metrics.values() if hasattr(metrics, "values") else [metrics]:
            if isinstance(metric, ConfusionMetric):
                labels = outputs.argmax(dim=1) if labels is None else labels
                metric.update(labels, targets)
            else:
                probs = outputs.float().softmax(dim=1) if probs is None else probs
                metric.update(probs, targets)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(dim=1)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().softmax(dim=1)

    def outputs_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.clamp_min(torch.finfo(scores.dtype).tiny).log()  # softmax(log p) = p

    def prediction_writer(self, options: Any) -> Any:
        from torchkiln.tasks.predictions import ClassWriter

        return ClassWriter(options, options.num_classes)

    def report_views(self, outputs: torch.Tensor, targets: torch.Tensor,
                     class_names: list[str] | None = None) -> list[ReportView]:
        return [ReportView("", "multiclass", self.predict(outputs), targets.long(), int(outputs.shape[1]), class_names)]


@TASKS.register(name="regression")
class RegressionTask(Task):
    """One or more real targets; outputs are (N,) or (N, T). `targets` is T (the model's width)."""

    name = "regression"
    default_loss = "MSELoss"
    default_metrics = ("rmse", "mae", "r2")
    metric_kind = "regression"
    concat_metric_updates = True

    def __init__(self, targets: int = 1):
        if int(targets) < 1:
            raise ValueError(f"targets must be at least 1; found {targets}")
        self.targets = int(targets)
        self.target_scale: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, std): data.normalize

    def set_target_scale(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The model learns (target - mean) / std; its outputs are mapped back to target units, so
        metrics and predictions are in the data's units and the loss is on the standardized scale."""
        self.target_scale = (mean.float(), std.float())

    def _scale_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.target_scale  # type: ignore[misc]
        if mean.device != device:
            self.target_scale = mean, std = mean.to(device), std.to(device)
        return mean, std

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, Any]:
        outputs, targets = super().forward(model, batch)
        if self.target_scale is None:
            return outputs, targets
        mean, std = self._scale_on(outputs.device)
        return outputs.float() * std + mean, targets  # (mean, std) shaped like one sample's target

    def num_outputs(self, num_classes: int | None) -> int | None:
        return self.targets

    def build_metrics(self, specs: list[Any], num_classes: int | None):
        return super().build_metrics(specs, self.targets)  # per-target metrics need the target count

    def loss(self, loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = need_targets(targets)
        outputs, targets = outputs.reshape(targets.shape).float(), targets.float()
        if self.target_scale is not None:
            mean, std = self._scale_on(outputs.device)
            outputs, targets = (outputs - mean) / std, (targets - mean) / std
        return loss_fn(outputs, targets)

    def update_metrics(self, metrics: Any, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        # float64: the metrics' sums of squares lose digits in float32 on targets with a large offset
        metrics.update(outputs.detach().double().reshape(targets.shape), targets.double())

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.squeeze(1) if outputs.dim() == 2 and outputs.shape[1] == 1 else outputs

    def prediction_writer(self, options: Any) -> Any:
        from torchkiln.tasks.predictions import PredictionWriter

        return PredictionWriter(options, self.targets)
