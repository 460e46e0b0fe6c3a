"""Several classification heads on one model, each with its own loss, weight and metrics, plus a
combined class (mixed radix over the heads in order).

The face-mask competition shape: heads mask (3), gender (2), age (3) and combined class
mask*6 + gender*3 + age (18 classes)::

    task:
      type: multihead
      args:
        heads:
          mask: {classes: 3, loss: {type: FocalLoss, args: {gamma: 2}}}
          gender: 2
          age: {classes: 3, weight: 2.0, metrics: [f1_macro]}
    model: {type: MLP, args: {num_classes: 8}}   # the sum of the head sizes

The model returns either one tensor (N, sum of sizes), split in head order, or a dict
{head: logits}. Targets are (N, heads) class indices, a dict {head: labels}, or the combined
class (N,), decoded into the heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from torchkiln.errors import ConfigError, DataError, did_you_mean
from torchkiln.registry import TASKS
from torchkiln.tasks.base import ClassificationTask, ReportView


@dataclass
class HeadSpec:
    """One head: its class count, loss weight, and optional own loss, metrics and class names."""

    classes: int
    weight: float = 1.0
    loss: dict[str, Any] | list[dict[str, Any]] | None = None  # default: the config's loss
    metrics: list[str | dict[str, Any]] | None = None  # default: the config's metrics
    names: list[str] | None = None  # class names for reports

    @classmethod
    def parse(cls, raw: Any, where: str) -> HeadSpec:
        """Plain checks (no pydantic here: the engine side stays importable without it)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a class count or a mapping; found {raw!r}")
        valid = [f.name for f in fields(cls)]
        for key in raw:
            if key not in valid:
                raise ConfigError(f"{where}.{key}: unknown key{did_you_mean(key, valid)} (valid: {', '.join(valid)})")
        if "classes" not in raw:
            raise ConfigError(f"{where}.classes: required key is missing")
        classes, weight = raw["classes"], raw.get("weight", 1.0)
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise ConfigError(f"{where}.classes: expected an integer >= 2; found {classes!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"{where}.weight: expected a number >= 0; found {weight!r}")
        names = raw.get("names")
        if names is not None and (not isinstance(names, list) or len(names) != classes):
            raise ConfigError(f"{where}.names: expected a list of {classes} class names; found {names!r}")
        return cls(classes, float(weight), raw.get("loss"), raw.get("metrics"), names)


class MultiHeadLoss(nn.Module):
    """sum over heads of weight_h * loss_h(outputs[h], targets[h])."""

    def __init__(self, losses: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weights = dict(weights)

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = self.parts(outputs, targets)
        return sum(self.weights[h] * v for h, v in parts.items())  # type: ignore[return-value]

    def parts(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {h: loss(outputs[h], targets[h]) for h, loss in self.losses.items()}


@TASKS.register(name="multihead")
class MultiHeadTask(ClassificationTask):
    """Metrics are logged per head (`val/mask/f1_macro`) and for the combined class (`val/combined/...`)."""

    name = "multihead"

    def __init__(self, heads: dict[str, int | dict[str, Any]] | None = None, combined: str | bool = "combined",
                 combined_metrics: list[str | dict[str, Any]] | None = None):
        if not heads:
            raise ConfigError("task.args.heads: multihead needs its heads, e.g. {mask: 3, gender: 2, age: 3}")
        self.heads: dict[str, HeadSpec] = {}
        for name, spec in heads.items():
            if "/" in name or "." in name or name == combined:
                raise ConfigError(f"task.args.heads.{name}: a head name cannot contain '/' or '.' nor be"
                                  f" the combined name '{combined}'")
            raw = {"classes": spec} if isinstance(spec, int) else spec
            self.heads[name] = HeadSpec.parse(raw, f"task.args.heads.{name}")
        self.combined = (combined if isinstance(combined, str) else "combined") if combined else None
        self.combined_metrics = combined_metrics
        self.sizes = [h.classes for h in self.heads.values()]
        self.num_combined = math.prod(self.sizes)

    # -- shapes ----------------------------------------------------------------------------
    def num_outputs(self, num_classes: int | None) -> int | None:
        return sum(self.sizes)

    def check_class_names(self, class_names: Any) -> None:
        """Label columns by head: each within its head's classes. One label column: the combined
        class, whose class indices must be the combined classes themselves (0 .. N-1, all listed)."""
        if isinstance(class_names, dict):
            missing = [h for h in self.heads if h not in class_names]
            if missing:
                raise ConfigError(f"data.dataset.args.label_col: no column for head(s) {', '.join(missing)}"
                                  f" (columns: {', '.join(class_names)}); name the heads like the label columns")
            for h, spec in self.heads.items():
                names = class_names[h] or []
                if len(names) > spec.classes:
                    raise ConfigError(f"task.args.heads.{h}.classes: {spec.classes}, but column '{h}' has"
                                      f" {len(names)} classes ({', '.join(map(str, names))})")
        elif isinstance(class_names, list):
            expected = [str(i) for i in range(self.num_combined)]
            if [str(c) for c in class_names] != expected:
                shown = ", ".join(map(str, class_names[:20])) + (", ..." if len(class_names) > 20 else "")
                raise ConfigError(f"data.dataset: a combined-class label column must hold the classes 0..{self.num_combined - 1}"
                                  f" in order (found {len(class_names)}: {shown}); list them all with"
                                  f" data.dataset.args.classes: [0, 1, ..., {self.num_combined - 1}]")

    def head_outputs(self, outputs: Any) -> dict[str, torch.Tensor]:
        if isinstance(outputs, dict):
            missing = [h for h in self.heads if h not in outputs]
            if missing:
                raise DataError(f"multihead: the model's output dict lacks head(s) {', '.join(missing)}")
            return {h: outputs[h] for h in self.heads}
        width = sum(self.sizes)
        if outputs.dim() != 2 or outputs.shape[1] != width:
            raise ConfigError(f"multihead: the model gives outputs of shape {tuple(outputs.shape)}; the heads"
                              f" need (N, {width}) (set model.args.num_classes: {width})")
        return dict(zip(self.heads, outputs.split(self.sizes, dim=1)))

    def head_targets(self, targets: Any) -> dict[str, torch.Tensor]:
        if isinstance(targets, dict):
            missing = [h for h in self.heads if h not in targets]
            if missing:
                raise DataError(f"multihead: the targets have no head(s) {', '.join(missing)} (they have"
                                f" {', '.join(targets)}); name the heads like the dataset's label columns")
            return {h: torch.as_tensor(targets[h]).long() for h in self.heads}
        targets = torch.as_tensor(targets)
        if targets.dim() == 1:
            return self.decode(targets.long())
        if targets.dim() != 2 or targets.shape[1] != len(self.heads):
            raise DataError(f"multihead: targets of shape {tuple(targets.shape)}; expected (N, {len(self.heads)})"
                            f" class indices, the combined class (N,), or a dict by head")
        return {h: targets[:, i].long() for i, h in enumerate(self.heads)}

    def encode(self, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Combined class: mixed radix over the heads in order (mask*6 + gender*3 + age)."""
        code = torch.zeros_like(next(iter(labels.values())))
        for h, size in zip(self.heads, self.sizes):
            code = code * size + labels[h]
        return code

    def decode(self, combined: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        rest = combined
        for h, size in reversed(list(zip(self.heads, self.sizes))):
            out[h] = rest % size
            rest = rest // size
        return {h: out[h] for h in self.heads}

    def sampling_labels(self, targets: Any, head: str | None = None) -> torch.Tensor:
        """Each sample's class for balanced sampling: one head's, or (head None) the combined class."""
        labels = self.head_targets(targets)
        return labels[head] if head is not None else self.encode(labels)

    def check_head(self, head: str, where: str) -> None:
        if head not in self.heads:
            raise ConfigError(f"{where}: '{head}' is not a head of the task{did_you_mean(head, list(self.heads))}"
                              f" (heads: {', '.join(self.heads)})")

    def combined_probs(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """P(combined class) as the product of the heads' probabilities; its argmax is the heads' argmaxes."""
        joint = None
        for h in self.heads:
            p = probs[h]
            joint = p if joint is None else (joint.unsqueeze(2) * p.unsqueeze(1)).reshape(len(p), -1)
        return joint  # type: ignore[return-value]

    # -- the step --------------------------------------------------------------------------
    def loss(self, loss_fn: nn.Module, outputs: Any, targets: Any) -> torch.Tensor:
        outs, tgts = self.head_outputs(outputs), self.head_targets(targets)
        if isinstance(loss_fn, MultiHeadLoss):
            return loss_fn(outs, tgts)
        return sum(spec.weight * loss_fn(outs[h], tgts[h]) for h, spec in self.heads.items())  # type: ignore[return-value]

    def update_metrics(self, metrics: Any, outputs: Any, targets: Any) -> None:
        probs = {h: o.detach().float().softmax(dim=1) for h, o in self.head_outputs(outputs).items()}
        tgts = self.head_targets(targets)
        if self.combined:
            probs[self.combined] = self.combined_probs(probs)
            tgts[self.combined] = self.encode(tgts)
        for key, metric in metrics.items(keep_base=True):
            view = key.split("/", 1)[0]
            metric.update(probs[view], tgts[view])

    def predict(self, outputs: Any) -> dict[str, torch.Tensor]:
        preds = {h: o.argmax(dim=1) for h, o in self.head_outputs(outputs).items()}
        if self.combined:
            preds[self.combined] = self.encode(preds)
        return preds

    def scores(self, outputs: Any) -> dict[str, torch.Tensor]:
        return {h: o.float().softmax(dim=1) for h, o in self.head_outputs(outputs).items()}

    def outputs_from_scores(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {h: p.clamp_min(torch.finfo(p.dtype).tiny).log() for h, p in scores.items()}

    def prediction_writer(self, options: Any) -> Any:
        from torchkiln.tasks.predictions import MultiHeadWriter

        return MultiHeadWriter(options, self)

    # -- building --------------------------------------------------------------------------
    def build_metrics(self, specs: list[Any], num_classes: int | None):
        from torchkiln.metrics import MetricSet, metric_dict

        base = list(specs) or list(self.default_metrics)
        metrics = {}
        if self.combined:
            metrics.update(metric_dict(self.combined_metrics or base, self.num_combined, "multiclass",
                                       prefix=f"{self.combined}/", where="task.args.combined_metrics"))
        for h, spec in self.heads.items():
            metrics.update(metric_dict(spec.metrics or base, spec.classes, "multiclass", prefix=f"{h}/",
                                       where=f"task.args.heads.{h}.metrics"))
        self.metric_order = list(metrics)
        return MetricSet(metrics)

    def make_loss(self, specs: list[dict[str, Any]] | None, labels: Callable[[], torch.Tensor] | None = None,
                  num_classes: int | None = None) -> nn.Module:
        from torchkiln.losses import from_specs

        cache: dict[str, Any] = {}

        def head_labels(h: str) -> Callable[[], torch.Tensor] | None:
            if labels is None:
                return None

            def get() -> torch.Tensor:
                if "all" not in cache:
                    cache["all"] = self.head_targets(labels())
                return cache["all"][h]

            return get

        losses, weights = {}, {}
        for h, spec in self.heads.items():
            own = spec.loss
            head_specs = ([own] if isinstance(own, dict) else own) if own is not None else \
                (specs or [{"type": self.default_loss}])
            where = f"task.args.heads.{h}.loss" if own is not None else "loss"
            losses[h] = from_specs(head_specs, where, head_labels(h), spec.classes)
            weights[h] = spec.weight
        return MultiHeadLoss(losses, weights)

    def _monitor_order(self, metric_names: list[str]) -> list[str]:
        names = super()._monitor_order(metric_names)
        combined = [n for n in names if self.combined and n.startswith(f"{self.combined}/")]
        return combined + [n for n in names if n not in combined]

    def validation_views(self, outputs: Any, targets: Any) -> list[ReportView]:
        """Each head, then the combined class: a confusion matrix and misclassified inputs for each."""
        return self.report_views(outputs, targets)

    def report_views(self, outputs: Any, targets: Any, class_names: list[str] | None = None) -> list[ReportView]:
        preds, tgts = self.predict(outputs), self.head_targets(targets)
        views = [ReportView(h, "multiclass", preds[h], tgts[h], spec.classes, spec.names)
                 for h, spec in self.heads.items()]
        if self.combined:
            views.append(ReportView(self.combined, "multiclass", preds[self.combined], self.encode(tgts),
                                    self.num_combined, None))
        return views
