"""Metrics by name, built on torchmetrics: exact over an epoch's samples, ready for DDP sync."""

from __future__ import annotations

from typing import Any

from torchmetrics import Metric, MetricCollection

from torchkiln.errors import ConfigError
from torchkiln.registry import METRICS, check_args


def _needs_classes(name: str, num_classes: int | None) -> int:
    if num_classes is None:
        raise ConfigError(f"metrics: '{name}' needs the number of classes; set model.args.num_classes")
    return num_classes


def _classification(name: str, cls_name: str, **fixed: Any):
    def factory(num_classes: int | None = None, **args: Any) -> Metric:
        import torchmetrics.classification as C

        return getattr(C, cls_name)(num_classes=_needs_classes(name, num_classes), **{**fixed, **args})

    factory.__name__ = name
    METRICS.register(factory, name=name)


_classification("accuracy", "MulticlassAccuracy", average="micro")
_classification("balanced_accuracy", "MulticlassAccuracy", average="macro")
_classification("top5_accuracy", "MulticlassAccuracy", average="micro", top_k=5)
for _avg in ("macro", "micro", "weighted"):
    _classification(f"f1_{_avg}", "MulticlassF1Score", average=_avg)
    _classification(f"precision_{_avg}", "MulticlassPrecision", average=_avg)
    _classification(f"recall_{_avg}", "MulticlassRecall", average=_avg)
_classification("auroc", "MulticlassAUROC", average="macro")


def _regression(name: str, cls_name: str, **fixed: Any):
    def factory(num_classes: int | None = None, **args: Any) -> Metric:
        import torchmetrics.regression as R

        return getattr(R, cls_name)(**{**fixed, **args})

    factory.__name__ = name
    METRICS.register(factory, name=name)


_regression("mae", "MeanAbsoluteError")
_regression("mse", "MeanSquaredError")
_regression("rmse", "MeanSquaredError", squared=False)
_regression("r2", "R2Score")


def build_metrics(specs: list[str | dict[str, Any]], num_classes: int | None) -> MetricCollection:
    """`specs` are names or {type, args}; the collection's keys are the names."""
    metrics: dict[str, Metric] = {}
    for i, spec in enumerate(specs):
        name, args = (spec, {}) if isinstance(spec, str) else (spec["type"], dict(spec.get("args") or {}))
        factory = METRICS.get(name, where=f"metrics.{i}")
        if ":" in name:  # a user's torchmetrics.Metric class by import path
            metric = factory(**args)
            key = name.rpartition(":")[2]
        else:
            metric = factory(num_classes=num_classes, **args)
            key = name
        metrics[key] = metric
    return MetricCollection(metrics, compute_groups=False)


def check_metric_specs(specs: list[str | dict[str, Any]]) -> None:
    for i, spec in enumerate(specs):
        name, args = (spec, {}) if isinstance(spec, str) else (spec["type"], dict(spec.get("args") or {}))
        factory = METRICS.get(name, where=f"metrics.{i}")
        if ":" in name:
            check_args(factory, args, f"metrics.{i}.args")
