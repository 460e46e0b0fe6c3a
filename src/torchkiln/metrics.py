"""Metrics by name, built on torchmetrics: exact over an epoch's samples, ready for DDP sync.

One name means the same quantity for every task kind that has it: `f1_macro` is a
MulticlassF1Score for classification and a MultilabelF1Score for multi-label. `name@k` sets
`top_k` (`ndcg@10`, `hit_rate@5`, `accuracy@5`). Per-class metrics (`*_per_class`) and
`confusion_matrix` are not scalars: the Trainer logs per-class vectors as `name/<i>` and leaves
matrices to the reports.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torchmetrics import Metric, MetricCollection

from torchkiln.errors import ConfigError
from torchkiln.registry import METRICS, check_args, construct

KINDS = ("multiclass", "multilabel", "regression", "ranking")
_TABLE: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}

C, R, T = "torchmetrics.classification", "torchmetrics.regression", "torchmetrics.retrieval"


def _cls(path: str) -> type[Metric]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _register(name: str, fast: dict[str, tuple[str, dict[str, Any]]] | None = None,
              **kinds: tuple[str, dict[str, Any]]) -> None:
    """`kinds` maps a task kind to ('module:Class', fixed keyword arguments); `fast`, by kind, a
    cheaper class for the same quantity, used when the metric is asked for without arguments."""
    _TABLE[name] = kinds
    fast = fast or {}

    def factory(num_classes: int | None = None, kind: str = "multiclass", threshold: float = 0.5,
                top_k: int | None = None, **args: Any) -> Metric:
        if kind not in kinds:
            raise ConfigError(f"metrics: '{name}' does not apply to a {kind} task; it is for"
                              f" {', '.join(kinds)} (metrics for {kind}: {', '.join(names_for(kind))})")
        path, fixed = fast[kind] if kind in fast and not args and top_k is None else kinds[kind]
        cls = _cls(path)
        params = inspect.signature(cls.__init__).parameters
        kw = {**fixed, **args}
        for key in ("num_classes", "num_labels"):
            if key in params:
                if num_classes is None:
                    raise ConfigError(f"metrics: '{name}' needs the number of classes; set model.args.num_classes")
                kw[key] = num_classes
        if kind == "multilabel" and "threshold" in params:
            kw.setdefault("threshold", threshold)
        if top_k is not None:
            if "top_k" not in params:
                raise ConfigError(f"metrics: '{name}' has no top_k (no '@k' form)")
            kw["top_k"] = top_k
        return construct(cls, kw, "metrics", f"'{name}' for a {kind} task")

    factory.__name__ = name
    METRICS.register(factory, name=name)


def names_for(kind: str) -> list[str]:
    return sorted(n for n, kinds in _TABLE.items() if kind in kinds)


# -- classification (single- and multi-label) --------------------------------------------------
# Single-label accuracy, precision, recall and F1 come from one confusion matrix (torchkiln.confusion,
# one bincount per update); with arguments (torchmetrics' ignore_index, ...) or top_k, torchmetrics'.
_CM = "torchkiln.confusion:ConfusionMetric"
_register("accuracy", multiclass=(f"{C}:MulticlassAccuracy", {"average": "micro"}),
          multilabel=(f"{C}:MultilabelAccuracy", {"average": "micro"}),  # label-wise (1 - Hamming loss)
          fast={"multiclass": (_CM, {"stat": "accuracy", "average": "micro"})})
_register("balanced_accuracy", multiclass=(f"{C}:MulticlassAccuracy", {"average": "macro"}),
          fast={"multiclass": (_CM, {"stat": "recall", "average": "macro"})})
for _k in (2, 3, 5):
    _register(f"top{_k}_accuracy", multiclass=(f"{C}:MulticlassAccuracy", {"average": "micro", "top_k": _k}))
_register("exact_match", multilabel=(f"{C}:MultilabelExactMatch", {}))  # sklearn's accuracy_score
_register("hamming_loss", multilabel=(f"{C}:MultilabelHammingDistance", {"average": "micro"}))
for _avg, _tm in (("macro", "macro"), ("micro", "micro"), ("weighted", "weighted"), ("per_class", "none")):
    for _name, _stem in (("f1", "F1Score"), ("precision", "Precision"), ("recall", "Recall")):
        _register(f"{_name}_{_avg}", multiclass=(f"{C}:Multiclass{_stem}", {"average": _tm}),
                  multilabel=(f"{C}:Multilabel{_stem}", {"average": _tm}),
                  fast={"multiclass": (_CM, {"stat": _name, "average": _tm})})
_register("auroc", multiclass=(f"{C}:MulticlassAUROC", {"average": "macro"}),
          multilabel=(f"{C}:MultilabelAUROC", {"average": "macro"}))
_register("average_precision", multiclass=(f"{C}:MulticlassAveragePrecision", {"average": "macro"}),
          multilabel=(f"{C}:MultilabelAveragePrecision", {"average": "macro"}))
_register("confusion_matrix", multiclass=(f"{C}:MulticlassConfusionMatrix", {}),
          multilabel=(f"{C}:MultilabelConfusionMatrix", {}))

# -- regression --------------------------------------------------------------------------------
_register("mae", regression=(f"{R}:MeanAbsoluteError", {}))
_register("mse", regression=(f"{R}:MeanSquaredError", {}))
_register("rmse", regression=(f"{R}:MeanSquaredError", {"squared": False}))
_register("r2", regression=(f"{R}:R2Score", {}))

# -- ranking (grouped by query id; a query without a relevant item scores 0) -------------------
_register("mrr", ranking=(f"{T}:RetrievalMRR", {}))
_register("ndcg", ranking=(f"{T}:RetrievalNormalizedDCG", {}))
_register("map", ranking=(f"{T}:RetrievalMAP", {}))
_register("hit_rate", ranking=(f"{T}:RetrievalHitRate", {}))
_register("precision_at", ranking=(f"{T}:RetrievalPrecision", {}))
_register("recall_at", ranking=(f"{T}:RetrievalRecall", {}))


def parse_name(name: str, where: str = "metrics") -> tuple[str, int | None]:
    """'ndcg@10' -> ('ndcg', 10); 'accuracy' -> ('accuracy', None)."""
    if ":" in name or "@" not in name:
        return name, None
    base, _, k = name.rpartition("@")
    if not k.isdigit() or int(k) < 1:
        raise ConfigError(f"{where}: '{name}': the part after '@' must be a positive integer, e.g. ndcg@10")
    return base, int(k)


def _spec(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    return spec["type"], dict(spec.get("args") or {})


def build_metrics(specs: list[str | dict[str, Any]], num_classes: int | None, kind: str = "multiclass",
                  threshold: float = 0.5, prefix: str = "", where: str = "metrics") -> MetricCollection:
    """`specs` are names or {type, args}; the collection's keys are `prefix` + the names."""
    return MetricCollection(metric_dict(specs, num_classes, kind, threshold, prefix, where), compute_groups=False)


def metric_dict(specs: list[str | dict[str, Any]], num_classes: int | None, kind: str = "multiclass",
                threshold: float = 0.5, prefix: str = "", where: str = "metrics") -> dict[str, Metric]:
    metrics: dict[str, Metric] = {}
    for i, spec in enumerate(specs):
        name, args = _spec(spec)
        base, top_k = parse_name(name, f"{where}.{i}")
        factory = METRICS.get(base, where=f"{where}.{i}")
        if ":" in name:  # a user's torchmetrics.Metric class by import path
            metric = factory(**args)
            key = name.rpartition(":")[2]
        else:
            metric = factory(num_classes=num_classes, kind=kind, threshold=threshold, top_k=top_k, **args)
            key = name
        metrics[prefix + key] = metric
    return metrics


def check_metric_specs(specs: list[str | dict[str, Any]], where: str = "metrics") -> None:
    for i, spec in enumerate(specs):
        name, args = _spec(spec)
        base, _ = parse_name(name, f"{where}.{i}")
        factory = METRICS.get(base, where=f"{where}.{i}")
        if ":" in name:
            check_args(factory, args, f"{where}.{i}.args")


def is_scalar_name(name: str) -> bool:
    """Whether a metric name gives one number (a candidate for `trainer.monitor`)."""
    last = name.rsplit("/", 1)[-1]
    return not (last.endswith("_per_class") or last == "confusion_matrix")
