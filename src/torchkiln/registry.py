"""Name -> factory, for every pluggable kind. `package.module:Name` import paths work everywhere."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from torchkiln.errors import ConfigError, did_you_mean


class Registry:
    """Holds factories by name; `fallbacks` are modules searched for names not registered."""

    def __init__(self, kind: str, fallbacks: Iterable[str] = (), predicate: Callable | None = None,
                 unavailable: dict[str, str] | None = None):
        self.kind = kind
        # Names a fallback module has that cannot be built from a config, with what to do instead.
        self.unavailable = dict(unavailable or {})
        self._items: dict[str, Callable] = {}
        self._schemes: dict[str, Callable[[str, str], Callable]] = {}
        self._fallbacks = tuple(fallbacks)
        self._predicate = predicate or (lambda obj: callable(obj))

    def register(self, obj: Callable | None = None, *, name: str | None = None):
        """Use as `@REG.register` or `@REG.register(name="x")`."""

        def add(o: Callable) -> Callable:
            key = name or o.__name__
            self._items[key] = o
            return o

        return add(obj) if obj is not None else add

    def register_scheme(self, scheme: str, resolve: Callable[[str, str], Callable]) -> None:
        """Names `scheme:rest` are resolved by `resolve(rest, where)` (e.g. `timm:resnet18`)."""
        self._schemes[scheme] = resolve

    def _fallback_names(self) -> dict[str, Callable]:
        found: dict[str, Callable] = {}
        for modname in self._fallbacks:
            mod = importlib.import_module(modname)
            for attr in dir(mod):
                if attr.startswith("_") or attr in self.unavailable:
                    continue
                obj = getattr(mod, attr)
                if self._predicate(obj):
                    found.setdefault(attr, obj)
        return found

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._fallback_names()))

    def get(self, name: str, where: str = "type") -> Callable:
        """Resolve a registered name or an import path; raise ConfigError naming `where`."""
        scheme, sep, rest = name.partition(":")
        if sep and scheme in self._schemes:
            return self._schemes[scheme](rest, where)
        if ":" in name:
            return import_path(name, where)
        if name in self._items:
            return self._items[name]
        if name in self.unavailable:
            raise ConfigError(f"{where}: {self.kind} '{name}' cannot be built from a config: {self.unavailable[name]}")
        fallback = self._fallback_names()
        if name in fallback:
            return fallback[name]
        raise ConfigError(
            f"{where}: unknown {self.kind} '{name}'{did_you_mean(name, self.names())}"
            f" (or give an import path 'package.module:Name')"
        )


def import_path(path: str, where: str = "type") -> Any:
    """Import `package.module:Name` (dots after the colon walk attributes)."""
    modname, _, attr = path.partition(":")
    if not modname or not attr:
        raise ConfigError(f"{where}: bad import path '{path}'; expected 'package.module:Name'")
    try:
        obj: Any = importlib.import_module(modname)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module '{modname}' from '{path}': {exc} (searched: installed"
                          " packages, PYTHONPATH, the config file's folder and the working directory)") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module '{modname}' has no attribute '{attr}' (from '{path}')")
        obj = getattr(obj, part)
    return obj


def construct(factory: Callable, kwargs: dict[str, Any], where: str, what: str) -> Any:
    """Call a factory with config arguments: the one place where a TypeError or ValueError it
    raises becomes a ConfigError naming the config key (`where`) and the thing built (`what`)."""
    try:
        return factory(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: could not build {what}: {exc}") from exc


def build(comp: Any, registry: Registry, where: str, **extra: Any) -> Any:
    """A config component (`{type, args}`) built from `registry`; `extra` arguments give way to the
    config's own."""
    factory = registry.get(comp.type, f"{where}.type")
    return construct(factory, {**extra, **comp.args}, where, comp.type)


def check_args(factory: Callable, args: dict[str, Any], where: str, skip: Iterable[str] = ()) -> None:
    """Refuse arguments the factory does not accept, naming the closest valid one."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    from torchkiln.argtypes import hints_of, mismatch

    params = sig.parameters
    hints = hints_of(factory)
    for key, value in args.items():
        expected = mismatch(params[key], hints.get(key), value) if key in params else None
        if expected is not None:
            raise ConfigError(f"{where}.{key}: expected {expected} for {getattr(factory, '__name__', factory)},"
                              f" found {value!r}")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in args:
        if key not in params and key not in skip:
            raise ConfigError(
                f"{where}.{key}: unknown argument for {getattr(factory, '__name__', factory)}"
                f"{did_you_mean(key, valid)} (accepted: {', '.join(valid)})"
            )


def _is_class_of(module: str, base: str) -> Callable[[Any], bool]:
    def pred(obj: Any) -> bool:
        if not inspect.isclass(obj):
            return False
        mod = importlib.import_module(module)
        parent = getattr(mod, base, None)
        return parent is not None and issubclass(obj, parent) and obj is not parent

    return pred


# The one list of torchkiln's own registrations: the modules whose import fills the registries
# (and nothing else imports a module only to register it). Every path that resolves a name from a
# config calls load_builtins() first, so no name depends on what happened to be imported.
BUILTIN_MODULES = (
    "torchkiln.data.digits", "torchkiln.data.images", "torchkiln.data.tensorfile", "torchkiln.data.toy",
    "torchkiln.data.collate", "torchkiln.losses", "torchkiln.metrics", "torchkiln.models.small",
    "torchkiln.models.backbones", "torchkiln.tasks.base", "torchkiln.tasks.multilabel", "torchkiln.tasks.ranking",
    "torchkiln.tasks.multihead",
    "torchkiln.callbacks",
    "torchkiln.data.detection.datasets", "torchkiln.data.detection.collate", "torchkiln.models.detection",
    "torchkiln.tasks.detection",
)


def load_builtins() -> None:
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


MODELS = Registry("model")
DATASETS = Registry("dataset")
LOSSES = Registry(
    "loss", fallbacks=["torch.nn"], predicate=lambda o: inspect.isclass(o) and o.__name__.endswith("Loss"),
    unavailable={
        "AdaptiveLogSoftmaxWithLoss": "it is an output layer with its own weights (in_features, n_classes,"
        " cutoffs) that takes hidden features, not a loss of (outputs, targets); put it in your model",
        "LinearCrossEntropyLoss": "it holds the final linear layer's weights and takes hidden features, not"
        " a loss of (outputs, targets); put it in your model, or use CrossEntropyLoss",
        **{name: f"it takes {args}, not the (outputs, targets) that a task gives its loss; compute it in a loss"
           " module of your own (an import path) that takes (outputs, targets)" for name, args in (
               ("CTCLoss", "(log_probs, targets, input_lengths, target_lengths)"),
               ("CosineEmbeddingLoss", "(x1, x2, y)"), ("MarginRankingLoss", "(x1, x2, y)"),
               ("GaussianNLLLoss", "(input, target, var)"), ("TripletMarginLoss", "(anchor, positive, negative)"),
               ("TripletMarginWithDistanceLoss", "(anchor, positive, negative)"),
               ("MultiLabelMarginLoss", "class indices padded with -1 as targets"))},
    },
)
OPTIMIZERS = Registry(
    "optimizer", fallbacks=["torch.optim"], predicate=_is_class_of("torch.optim", "Optimizer"),
    unavailable={"Muon": "it updates 2-D weight matrices only, and a model's biases and norms need another"
                 " optimizer beside it; use two optimizers through the Python API"},
)
SCHEDULERS = Registry(
    "scheduler",
    fallbacks=["torch.optim.lr_scheduler"],
    predicate=lambda o: inspect.isclass(o)
    and o.__module__ == "torch.optim.lr_scheduler"
    and (o.__name__.endswith("LR")
         or o.__name__ in {"ReduceLROnPlateau", "CosineAnnealingWarmRestarts", "ChainedScheduler"}),
)
METRICS = Registry("metric")
CALLBACKS = Registry("callback")
TASKS = Registry("task")
