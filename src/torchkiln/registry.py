"""Name -> factory, for every pluggable kind. `package.module:Name` import paths work everywhere.

Installed packages add names through entry points (groups `torchkiln.models`, `torchkiln.datasets`,
`torchkiln.losses`, `torchkiln.metrics`, `torchkiln.callbacks`, `torchkiln.tasks`), loaded at a
registry's first lookup. A plugin that fails to load is one warning naming its distribution and the
error (`KILN_STRICT_PLUGINS=1`: an error), and the other names keep working. A name registered
twice is refused, naming both sources.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sysconfig
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from torchkiln.errors import ConfigError, KilnError, SettingError, described, did_you_mean

log = logging.getLogger("torchkiln")
BUILTIN = "built-in"
STRICT_ENV = "KILN_STRICT_PLUGINS"


class PluginError(ConfigError):
    """A plugin's entry point could not be loaded or registered (an error with KILN_STRICT_PLUGINS=1)."""


class Registry:
    """Holds factories by name; `fallbacks` are modules searched for names not registered."""

    def __init__(self, kind: str, fallbacks: Iterable[str] = (), predicate: Callable | None = None,
                 unavailable: dict[str, str] | None = None, group: str | None = None):
        self.kind = kind
        self.group = group  # the entry-point group whose names are added at the first lookup
        self._plugins_loaded = group is None
        self._sources: dict[str, str] = {}  # name -> where it came from (built-in or a distribution)
        self._listers: dict[str, Callable[[], dict[str, Callable]]] = {}
        # Names a fallback module has that cannot be built from a config, with what to do instead.
        self.unavailable = dict(unavailable or {})
        self._items: dict[str, Callable] = {}
        self._schemes: dict[str, Callable[[str, str], Callable]] = {}
        self._fallbacks = tuple(fallbacks)
        self._predicate = predicate or (lambda obj: callable(obj))

    def register(self, obj: Callable | None = None, *, name: str | None = None, source: str | None = None):
        """Use as `@REG.register` or `@REG.register(name="x")`; `source` says where the name comes
        from (default: built-in for torchkiln's modules, else the object's module)."""

        def add(o: Callable) -> Callable:
            key = name or o.__name__
            where = source or _source_of(o)
            old = self._items.get(key)
            if old is not None and _origin(old) != _origin(o):
                raise ConfigError(f"{self.kind} '{key}' is registered twice: by {self._sources[key]} and by"
                                  f" {where}; rename one of them")
            self._items[key] = o
            self._sources[key] = where
            return o

        return add(obj) if obj is not None else add

    def register_scheme(self, scheme: str, resolve: Callable[[str, str], Callable],
                        names: Callable[[], dict[str, Callable]] | None = None) -> None:
        """Names `scheme:rest` are resolved by `resolve(rest, where)` (e.g. `timm:resnet18`);
        `names()` lists them (name -> factory) for `kiln list`."""
        self._schemes[scheme] = resolve
        if names is not None:
            self._listers[scheme] = names

    def load_plugins(self) -> None:
        """Register the names of this registry's entry-point group (once)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        load_builtins()  # first, so that a plugin taking a built-in name is the one refused
        from importlib.metadata import entry_points

        for ep in sorted(entry_points(group=self.group), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
            try:
                obj = ep.load()
                if ep.name in self._fallback_names():
                    raise ConfigError(f"{self.kind} '{ep.name}' is registered twice: by"
                                      f" {_source_of(self._fallback_names()[ep.name])} and by plugin '{dist}'"
                                      f" ({ep.value}); rename one of them")
                self.register(obj, name=ep.name, source=f"plugin '{dist}' ({ep.value})")
            except Exception as exc:  # a broken plugin must not take the others down
                message = (f"plugin '{dist}': entry point {ep.name} = {ep.value} (group {self.group})"
                           f" not loaded: {type(exc).__name__}: {exc}")
                if os.environ.get(STRICT_ENV, "") not in ("", "0"):
                    raise PluginError(f"{message} ({STRICT_ENV} is set)") from exc
                log.warning("%s (set %s=1 to make this an error)", message, STRICT_ENV)

    def entries(self) -> list[tuple[str, str, Callable]]:
        """(name, source, factory) of every name this registry resolves, scheme names included."""
        self.load_plugins()
        rows = [(n, self._sources.get(n, BUILTIN), f) for n, f in self._items.items()]
        rows += [(n, _source_of(f), f) for n, f in self._fallback_names().items() if n not in self._items]
        for scheme, lister in self._listers.items():
            rows += [(f"{scheme}:{n}", scheme, f) for n, f in lister().items()]
        return sorted(rows, key=lambda r: r[0].lower())

    def source(self, name: str) -> str:
        self.load_plugins()
        return self._sources.get(name, BUILTIN)

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
        self.load_plugins()
        return sorted(set(self._items) | set(self._fallback_names()))

    def get(self, name: str, where: str = "type") -> Callable:
        """Resolve a registered name or an import path; raise ConfigError naming `where`."""
        scheme, sep, rest = name.partition(":")
        if sep and scheme in self._schemes:
            return self._schemes[scheme](rest, where)
        if ":" in name:
            return import_path(name, where)
        self.load_plugins()
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


def _origin(obj: Any) -> tuple[str, str]:
    """What an object is, by where it is defined: a module imported again registers the same names."""
    return getattr(obj, "__module__", "") or "", getattr(obj, "__qualname__", repr(obj))


def _source_of(obj: Any) -> str:
    module = (getattr(obj, "__module__", "") or "").split(".")[0]
    return BUILTIN if module == "torchkiln" else (module or BUILTIN)


def import_path(path: str, where: str = "type") -> Any:
    """Import `package.module:Name` (dots after the colon walk attributes)."""
    modname, _, attr = path.partition(":")
    if not modname or not attr:
        raise ConfigError(f"{where}: bad import path '{path}'; expected 'package.module:Name'")
    try:
        obj: Any = importlib.import_module(modname)
    except KilnError:
        raise
    except Exception as exc:
        if isinstance(exc, ModuleNotFoundError) and _is_module_or_parent(exc.name, modname):
            raise ConfigError(f"{where}: cannot import module '{modname}' from '{path}': {exc} (searched: installed"
                              " packages, PYTHONPATH, the config file's folder and the working directory)") from exc
        # The module was found and its own code failed as it ran: a syntax error, an import inside it, ...
        raise ConfigError(f"{where}: module '{modname}' (from '{path}') failed to import: {_failed_at(exc)}"
                          " (fix it there; `kiln --debug ...` shows the traceback)") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module '{modname}' has no attribute '{attr}' (from '{path}')")
        obj = getattr(obj, part)
    return obj


def _is_module_or_parent(missing: str | None, modname: str) -> bool:
    """Whether the module not found is `modname` or a package above it (not an import inside it)."""
    return missing is not None and (modname == missing or modname.startswith(missing + "."))


def _failed_at(exc: BaseException) -> str:
    """'file:line: Type: message' for an error raised while a user's module ran: the syntax error's
    own place, else the deepest frame outside Python's and the installed packages' files."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{_shown(exc.filename)}:{exc.lineno}: {type(exc).__name__}: {exc.msg}"
    frames = traceback.extract_tb(exc.__traceback__)[1:]  # below import_path's own frame
    frames = [f for f in frames if not f.filename.startswith("<")]
    library = tuple({sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    own = [f for f in frames if not f.filename.startswith(library)] or frames
    where = f"{_shown(own[-1].filename)}:{own[-1].lineno}: " if own else ""
    return f"{where}{described(exc)}"


def _shown(filename: str) -> str:
    """A file below the working directory by its relative path, any other in full."""
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive (Windows)
        return filename
    return filename if rel.startswith("..") else rel


def construct(factory: Callable, kwargs: dict[str, Any], where: str, what: str) -> Any:
    """Call a factory with config arguments: the one place where an error it raises (bad arguments,
    or any failure in a user's constructor) becomes a ConfigError naming the config key (`where`)
    and the thing built (`what`)."""
    try:
        return factory(**kwargs)
    except SettingError as exc:  # a part's own setting, given here (not the trainer's of that name)
        raise ConfigError(f"{where}: {exc}") from exc
    except KilnError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: could not build {what}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a user's constructor may raise anything
        raise ConfigError(f"{where}: could not build {what}: {described(exc)} (--debug shows the traceback)") from exc


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


MODELS = Registry("model", group="torchkiln.models")
DATASETS = Registry("dataset", group="torchkiln.datasets")
LOSSES = Registry(
    "loss", group="torchkiln.losses", fallbacks=["torch.nn"], predicate=lambda o: inspect.isclass(o) and o.__name__.endswith("Loss"),
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
METRICS = Registry("metric", group="torchkiln.metrics")
CALLBACKS = Registry("callback", group="torchkiln.callbacks")
TASKS = Registry("task", group="torchkiln.tasks")
# kind (as `kiln list` names it) -> registry
KINDS = {"models": MODELS, "datasets": DATASETS, "losses": LOSSES, "optimizers": OPTIMIZERS,
         "schedulers": SCHEDULERS, "metrics": METRICS, "callbacks": CALLBACKS, "tasks": TASKS}
