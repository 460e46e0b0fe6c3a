"""Metrics by name: exact over an epoch's samples, summed over ranks under DDP.

The common names are torchkiln's own (metrics/base.py: no torchmetrics import, about 4 s of start-up
on 2 cores); the rest, and a common name given torchmetrics' arguments, are torchmetrics' classes,
imported when such a metric is built.

One name means the same quantity for every task kind that has it: `f1_macro` is a
MulticlassF1Score for classification and a MultilabelF1Score for multi-label. `name@k` sets
`top_k` (`ndcg@10`, `hit_rate@5`, `accuracy@5`). Per-class metrics (`*_per_class`) and
`confusion_matrix` are not scalars: the Trainer logs per-class vectors as `name/<i>` and leaves
matrices to the reports. Common names are accepted too: `roc_auc` (= `auroc`), and `f1`, `precision`,
`recall`: the binary scores of class 1 for a two-class model (scikit-learn's defaults).

Regression metrics keep float64 states (targets with a large offset lose digits in float32 sums);
`rmse` of several targets is the mean of the per-target RMSEs, as in scikit-learn. Ranking metrics
are torchkiln's (torchkiln.metrics.retrieval): float64 scores, and ties scored as the expected value over
the tied items' orders, so the result does not depend on the order or batching of the samples.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from torchkiln.errors import ConfigError, did_you_mean
from torchkiln.metrics.base import Metric, MetricSet
from torchkiln.registry import METRICS, check_args, construct

KINDS = ("multiclass", "multilabel", "regression", "ranking")
_TABLE: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}

C, R = "torchmetrics.classification", "torchmetrics.regression"


class ClassCountError(ConfigError):
    """A metric that does not fit the model's class count (binary `f1` for ten classes, top-5 of
    three): the config check, which knows no class count yet, leaves it to the real build."""


def _cls(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _register(name: str, fast: dict[str, tuple[str, dict[str, Any]]] | None = None, top_k_class: str | None = None,
              **kinds: tuple[str, dict[str, Any]]) -> None:
    """`kinds` maps a task kind to ('module:Class', fixed keyword arguments); `fast`, by kind, the
    class used when the metric is asked for without arguments (cheaper, or torchkiln's convention
    where torchmetrics' differs); with arguments or top_k, the metric is the `kinds` class, or
    `top_k_class` ('module:Class') for a multi-class '@k' form."""
    _TABLE[name] = kinds
    fast = fast or {}

    def factory(num_classes: int | None = None, kind: str = "multiclass", threshold: float = 0.5,
                top_k: int | None = None, **args: Any) -> Any:
        if kind not in kinds:
            raise ConfigError(f"metrics: '{name}' does not apply to a {kind} task; it is for"
                              f" {', '.join(kinds)} (metrics for {kind}: {', '.join(names_for(kind))})")
        path, fixed = fast[kind] if kind in fast and not args and top_k is None else kinds[kind]
        if top_k is not None and top_k_class is not None and kind == "multiclass":
            path, fixed = top_k_class, {}
        cls = _cls(path)
        params = inspect.signature(cls.__init__).parameters
        kw = {**fixed, **args}
        if kind in ("multiclass", "multilabel"):  # ranking's @k counts items, not classes
            _check_class_count(name, num_classes, kw.get("average"), top_k or kw.get("top_k"))
        if "num_targets" in params and num_classes is not None:
            kw["num_targets"] = num_classes  # regression: the task passes its number of targets
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
        metric = construct(cls, kw, "metrics", f"'{name}' for a {kind} task")
        if kind == "regression" and not isinstance(metric, Metric):
            metric.set_dtype(torch.float64)  # torchmetrics' (torchkiln's keep float64 states)
        return metric

    factory.__name__ = name
    METRICS.register(factory, name=name)


def _check_class_count(name: str, num_classes: int | None, average: Any, top_k: int | None) -> None:
    if num_classes is None:
        return
    if average == "binary" and num_classes != 2:
        raise ClassCountError(f"metrics: '{name}' is the binary score of class 1 of two classes; this model has"
                              f" {num_classes} (use {name}_macro, {name}_micro or {name}_weighted)")
    if isinstance(top_k, int) and top_k > num_classes:
        raise ClassCountError(f"metrics: '{name}' needs at least {top_k} classes; this model has {num_classes}")


def names_for(kind: str) -> list[str]:
    return sorted(n for n, kinds in _TABLE.items() if kind in kinds)


# -- classification (single- and multi-label) --------------------------------------------------
# Single-label accuracy, precision, recall and F1 come from one confusion matrix (torchkiln.metrics.confusion,
# one bincount per update; scikit-learn's values, zero_division=0; targets below 0, the loss's
# ignore_index, left out); with arguments (torchmetrics' ignore_index, ...), torchmetrics' classes.
_CM = "torchkiln.metrics.confusion:ConfusionMetric"
_IGNORE = {"ignore_index": -100}
# accuracy@k and topK_accuracy: torchkiln.metrics.topk (tied scores: the lower class index first, as argmax)
_register("accuracy", multiclass=(f"{C}:MulticlassAccuracy", {"average": "micro", **_IGNORE}),
          multilabel=(f"{C}:MultilabelAccuracy", {"average": "micro"}),  # label-wise (1 - Hamming loss)
          fast={"multiclass": (_CM, {"stat": "accuracy", "average": "micro"})},
          top_k_class="torchkiln.metrics.topk:TopKAccuracy")
# scikit-learn's: mean recall over the classes in the targets (torchmetrics' macro accuracy also
# counts a class that is only predicted)
_register("balanced_accuracy", multiclass=(_CM, {"stat": "balanced_accuracy", "average": "macro"}))
for _k in (2, 3, 5):
    _register(f"top{_k}_accuracy", multiclass=("torchkiln.metrics.topk:TopKAccuracy", {"top_k": _k}))
_register("exact_match", multilabel=(f"{C}:MultilabelExactMatch", {}))  # sklearn's accuracy_score
_register("hamming_loss", multilabel=(f"{C}:MultilabelHammingDistance", {"average": "micro"}))
for _avg, _tm in (("macro", "macro"), ("micro", "micro"), ("weighted", "weighted"), ("per_class", "none")):
    for _name, _stem in (("f1", "F1Score"), ("precision", "Precision"), ("recall", "Recall")):
        _register(f"{_name}_{_avg}", multiclass=(f"{C}:Multiclass{_stem}", {"average": _tm, **_IGNORE}),
                  multilabel=(f"{C}:Multilabel{_stem}", {"average": _tm}),
                  fast={"multiclass": (_CM, {"stat": _name, "average": _tm})})
for _name in ("f1", "precision", "recall"):  # binary: class 1 of two, like scikit-learn's default
    _register(_name, multiclass=(_CM, {"stat": _name, "average": "binary"}))
# AUROC / AP: the macro mean over the classes where they are defined (torchkiln.metrics.curve_metrics); with
# arguments, torchmetrics' (which counts an undefined class as 0). For two classes, the macro
# AUROC over both is the binary ROC-AUC.
_CURVES = "torchkiln.metrics.curve_metrics"
for _name in ("auroc", "roc_auc"):
    _register(_name, multiclass=(f"{C}:MulticlassAUROC", {"average": "macro"}),
              multilabel=(f"{C}:MultilabelAUROC", {"average": "macro"}),
              fast={"multiclass": (f"{_CURVES}:MacroAUROC", {}), "multilabel": (f"{_CURVES}:MultilabelMacroAUROC", {})})
_register("average_precision", multiclass=(f"{C}:MulticlassAveragePrecision", {"average": "macro"}),
          multilabel=(f"{C}:MultilabelAveragePrecision", {"average": "macro"}),
          fast={"multiclass": (f"{_CURVES}:MacroAveragePrecision", {}),
                "multilabel": (f"{_CURVES}:MultilabelMacroAveragePrecision", {})})
_register("confusion_matrix", multiclass=(f"{C}:MulticlassConfusionMatrix", {}),
          multilabel=(f"{C}:MultilabelConfusionMatrix", {}))

# -- regression --------------------------------------------------------------------------------
_RM = "torchkiln.metrics.regression_metrics"
_register("mae", regression=(f"{R}:MeanAbsoluteError", {}), fast={"regression": (f"{_RM}:MAE", {})})
_register("mse", regression=(f"{R}:MeanSquaredError", {}), fast={"regression": (f"{_RM}:MSE", {})})
_register("rmse", regression=(f"{_RM}:PerTargetRMSE", {}))
# r2: scikit-learn's, stable at any offset and spread (torchmetrics' R2Score treats a total sum of
# squares below 1e-4 as 0 and scores 0); with arguments (adjusted, multioutput), torchmetrics'.
_register("r2", regression=(f"{R}:R2Score", {}), fast={"regression": (f"{_RM}:R2", {})})

# -- ranking (grouped by query id; a query without a relevant item scores 0; ties: expected value) --
for _name, _measure in (("mrr", "mrr"), ("ndcg", "ndcg"), ("map", "map"), ("hit_rate", "hit_rate"),
                        ("precision_at", "precision"), ("recall_at", "recall")):
    _register(_name, ranking=("torchkiln.metrics.retrieval:RankingMetric", {"measure": _measure}))


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
                  threshold: float = 0.5, prefix: str = "", where: str = "metrics") -> MetricSet:
    """`specs` are names or {type, args}; the set's keys are `prefix` + the names."""
    return MetricSet(metric_dict(specs, num_classes, kind, threshold, prefix, where))


def metric_dict(specs: list[str | dict[str, Any]], num_classes: int | None, kind: str = "multiclass",
                threshold: float = 0.5, prefix: str = "", where: str = "metrics") -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for i, spec in enumerate(specs):
        name, args = _spec(spec)
        base, top_k = parse_name(name, f"{where}.{i}")
        factory = _factory(base, f"{where}.{i}", kind)
        if ":" in name or inspect.isclass(factory):  # a user's metric class (import path, plugin)
            metric = factory(**args)
            key = name.rpartition(":")[2]
        else:
            metric = factory(num_classes=num_classes, kind=kind, threshold=threshold, top_k=top_k, **args)
            key = name
        metrics[prefix + key] = metric
    return metrics


def _factory(base: str, where: str, kind: str | None = None):
    """The registered factory of a metric name; an unknown name is refused with the valid ones."""
    if ":" not in base and base not in METRICS.names():
        valid = names_for(kind) if kind in KINDS else METRICS.names()
        what = f"metrics for a {kind} task" if kind in KINDS else "metric names"
        raise ConfigError(f"{where}: unknown metric '{base}'{did_you_mean(base, valid)} ({what}: {', '.join(valid)};"
                          " or an import path 'package.module:Name')")
    return METRICS.get(base, where=where)


def check_metric_specs(specs: list[str | dict[str, Any]], where: str = "metrics", kind: str | None = None) -> None:
    for i, spec in enumerate(specs):
        name, args = _spec(spec)
        base, _ = parse_name(name, f"{where}.{i}")
        factory = _factory(base, f"{where}.{i}", kind)
        if ":" in name or inspect.isclass(factory):
            check_args(factory, args, f"{where}.{i}.args")


def is_scalar_name(name: str) -> bool:
    """Whether a metric name gives one number (a candidate for `trainer.monitor`)."""
    last = name.rsplit("/", 1)[-1]
    return not (last.endswith("_per_class") or last == "confusion_matrix")
