"""torchkiln's own metric base and collection: states declared once, summed or concatenated over
ranks when computed, saved whole in a mid-epoch checkpoint.

The metrics a run uses by default (accuracy, P/R/F1, top-k, RMSE/MAE/MSE/R2, the ranking metrics)
are built on this, not on torchmetrics' `Metric`: importing torchmetrics imports torchvision (and
with it torch._dynamo and sympy), scipy.signal and matplotlib, about 4 s of every `kiln` start on
2 cores (benchmarks/startup.py). torchmetrics is imported only when a config names a metric that
is torchmetrics' (AUROC, multi-label, detection mAP, a metric given `args` for torchmetrics, a
user's class), and `MetricSet` holds either kind: it needs only `update`, `compute`, `reset`, `to`.

Same contract as torchmetrics' (`update / compute / reset`): `compute()` under torch.distributed
sees every rank's state (`sum`, `max`, `min`: all-reduced; `cat`: gathered in rank order) and
leaves the local state as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from torchkiln.errors import SettingError, refuse_class

REDUCTIONS = {"sum": "SUM", "max": "MAX", "min": "MIN", "cat": None}


class Metric:
    """Subclasses declare their states with `add_state` in `__init__`, and write `update(...)` and
    `score()` (the value from the states); `compute()` is `score()` over every rank's states."""

    higher_is_better: bool | None = None

    def __init__(self) -> None:
        self._defaults: dict[str, torch.Tensor | list] = {}
        self._reductions: dict[str, str] = {}
        self.device = torch.device("cpu")

    def add_state(self, name: str, default: torch.Tensor | list, reduce: str = "sum") -> None:
        """A tensor (`reduce`: sum, max or min over ranks) or an empty list of tensors (`cat`)."""
        if reduce not in REDUCTIONS or (reduce == "cat") != isinstance(default, list):
            raise ValueError(f"state '{name}': a list is gathered ('cat'), a tensor reduced (sum, max, min);"
                             f" found {type(default).__name__} with {reduce!r}")
        self._defaults[name] = [] if isinstance(default, list) else default.detach().clone()
        self._reductions[name] = reduce
        setattr(self, name, self._fresh(name))

    def _fresh(self, name: str) -> torch.Tensor | list:
        default = self._defaults[name]
        return [] if isinstance(default, list) else default.to(self.device, copy=True)

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def score(self) -> Any:
        raise NotImplementedError

    def reset(self) -> None:
        for name in self._defaults:
            setattr(self, name, self._fresh(name))

    def to(self, device: torch.device | str) -> Metric:
        self.device = torch.device(device)
        for name in self._defaults:
            value = getattr(self, name)
            setattr(self, name, [v.to(device) for v in value] if isinstance(value, list) else value.to(device))
        return self

    def compute(self) -> Any:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.score()
        local = {name: getattr(self, name) for name in self._defaults}
        for name, value in local.items():
            setattr(self, name, _over_ranks(value, self._reductions[name]))
        try:
            return self.score()
        finally:
            for name, value in local.items():
                setattr(self, name, value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The states (a list state as one tensor), for a checkpoint."""
        out = {}
        for name in self._defaults:
            value = getattr(self, name)
            if isinstance(value, list):
                value = torch.cat(value) if value else torch.zeros(0)
            out[name] = value.detach()
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self._defaults):
            raise ValueError(f"{type(self).__name__}: saved states {sorted(state)}, expected {sorted(self._defaults)}")
        for name, value in state.items():
            value = value.to(self.device)
            if isinstance(self._defaults[name], list):
                setattr(self, name, [value] if value.numel() else [])
            else:
                setattr(self, name, value.clone())


def _over_ranks(value: torch.Tensor | list, reduce: str) -> torch.Tensor | list:
    if reduce == "cat":  # ranks may hold different lengths (or nothing): gathered as objects, in rank order
        local = torch.cat(value).cpu() if value else None
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        device = value[0].device if value else None
        return [t.to(device) if device is not None else t for t in gathered if t is not None]
    total = value.clone()
    dist.all_reduce(total, op=getattr(dist.ReduceOp, REDUCTIONS[reduce]))
    return total


class MetricSet:
    """Named metrics (torchkiln's or torchmetrics'), updated, computed and reset together.

    Keys are `prefix` + each metric's name; `items(keep_base=True)` gives the names without it. A
    metric whose value is a dict (detection's loss parts) adds its own keys, prefixed.
    """

    def __init__(self, metrics: Mapping[str, Any], prefix: str = ""):
        self.metrics = dict(metrics)
        self.prefix = prefix

    def keys(self, keep_base: bool = False) -> list[str]:
        return [k if keep_base else self.prefix + k for k in self.metrics]

    def items(self, keep_base: bool = False) -> list[tuple[str, Any]]:
        return [(k if keep_base else self.prefix + k, m) for k, m in self.metrics.items()]

    def values(self) -> list[Any]:
        return list(self.metrics.values())

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key[len(self.prefix):] if self.prefix and key.startswith(self.prefix) else key]

    def __len__(self) -> int:
        return len(self.metrics)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def update(self, *args: Any, **kwargs: Any) -> None:
        for metric in self.metrics.values():
            metric.update(*args, **kwargs)

    def compute(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            if isinstance(value, Mapping):
                out.update({self.prefix + k: v for k, v in value.items()})
            else:
                out[self.prefix + name] = value
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def to(self, device: torch.device | str) -> MetricSet:
        for metric in self.metrics.values():
            metric.to(device)
        return self

    def clone(self, prefix: str = "") -> MetricSet:
        """A deep copy keyed with `prefix`; torchmetrics' members keep their states in its
        `state_dict` (persistent), so a mid-epoch checkpoint carries the epoch's partial state."""
        clone = MetricSet(copy.deepcopy(self.metrics), prefix)
        for metric in clone.metrics.values():
            if hasattr(metric, "persistent"):
                metric.persistent(True)
        return clone

    def state_dict(self) -> dict[str, Any]:
        return {k: dict(m.state_dict()) for k, m in self.metrics.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != set(self.metrics):
            raise ValueError(f"saved metrics {sorted(state)}, this run's {sorted(self.metrics)}")
        for k, m in self.metrics.items():
            m.load_state_dict(state[k])


def as_metric_set(metrics: Any) -> MetricSet:
    """A MetricSet from what a code-first user hands the Trainer: a MetricSet, a mapping (or a
    torchmetrics MetricCollection) of metrics, a list of metrics (keyed by class name), or one."""
    if isinstance(metrics, MetricSet):
        return metrics
    if hasattr(metrics, "items"):
        found = dict(metrics.items())
    else:
        if isinstance(metrics, (str, type)) or hasattr(metrics, "update") and hasattr(metrics, "compute"):
            metrics = [metrics]
        found = {type(m).__name__: m for m in metrics}
    _check_metrics(list(found.values()))
    return MetricSet(found)


def _check_metrics(metrics: list[Any]) -> None:
    """Refuse what is not a built metric: a name (it needs the task and class count), a class."""
    names = [m for m in metrics if isinstance(m, str)]
    if names:
        raise SettingError("metrics", f"names need the task and class count: metrics=build_metrics({names!r},"
                                      " num_classes=N) (from torchkiln.metrics; N: the model's classes)")
    for m in metrics:
        refuse_class("metrics", m, "a metric", "num_classes=...")
        if not all(hasattr(m, verb) for verb in ("update", "compute", "reset", "to")):
            raise SettingError("metrics", f"{type(m).__name__} is not a metric (it needs update, compute, reset"
                                          " and to): build them with torchkiln.metrics.build_metrics")
