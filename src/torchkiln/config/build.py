"""Config -> objects. Names are resolved (and their arguments checked) before anything heavy runs."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchkiln.config.schema import Component, Config
from torchkiln.errors import ConfigError, did_you_mean
from torchkiln.registry import DATASETS, LOSSES, MODELS, OPTIMIZERS, SCHEDULERS, TASKS, check_args


def _register_builtins() -> None:
    # Importing these modules fills the registries.
    import torchkiln.data.digits  # noqa: F401
    import torchkiln.metrics  # noqa: F401
    import torchkiln.models  # noqa: F401
    import torchkiln.tasks  # noqa: F401


def check_components(cfg: Config) -> None:
    """Every name resolves and every argument is accepted: a typo fails here, not mid-run."""
    _register_builtins()
    from torchkiln.metrics import check_metric_specs

    TASKS.get(cfg.task, "task")
    for where, comp, reg in _components(cfg):
        factory = reg.get(comp.type, f"{where}.type")
        skip = ("params",) if reg is OPTIMIZERS else ("optimizer",) if reg is SCHEDULERS else ()
        check_args(factory, comp.args, f"{where}.args", skip=skip)
    check_metric_specs([m if isinstance(m, str) else m.model_dump() for m in cfg.metrics])
    if cfg.scheduler is not None and cfg.scheduler.type == "ReduceLROnPlateau" and cfg.scheduler.interval == "step":
        raise ConfigError("scheduler.interval: ReduceLROnPlateau needs the monitored metric, which exists only"
                          " after validation; use interval: epoch (or leave it out)")


def _components(cfg: Config):
    yield "data.dataset", cfg.data.dataset, DATASETS
    if cfg.data.val_dataset:
        yield "data.val_dataset", cfg.data.val_dataset, DATASETS
    if cfg.data.test_dataset:
        yield "data.test_dataset", cfg.data.test_dataset, DATASETS
    yield "model", cfg.model, MODELS
    if isinstance(cfg.loss, list):
        for i, c in enumerate(cfg.loss):
            yield f"loss.{i}", c, LOSSES
    elif cfg.loss is not None:
        yield "loss", cfg.loss, LOSSES
    yield "optimizer", cfg.optimizer, OPTIMIZERS
    if cfg.scheduler is not None:
        yield "scheduler", cfg.scheduler, SCHEDULERS


def build(comp: Component, registry, where: str, **extra: Any) -> Any:
    factory = registry.get(comp.type, f"{where}.type")
    try:
        return factory(**extra, **comp.args)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: could not build {comp.type}: {exc}") from exc


@dataclass
class Data:
    train: Any
    val: Any | None
    test: Any | None
    num_classes: int | None
    class_names: list[str] | None


def build_data(cfg: Config, splits: tuple[str, ...] = ("train", "val", "test")) -> Data:
    from torchkiln.data.splits import split_dataset

    _register_builtins()
    d = cfg.data
    dataset = build(d.dataset, DATASETS, "data.dataset")
    seed = d.split_seed if d.split_seed is not None else cfg.seed
    val_frac = 0.0 if d.val_dataset else d.val_split
    test_frac = 0.0 if d.test_dataset else d.test_split
    train, val, test = split_dataset(dataset, val_frac, test_frac, seed, stratify=d.stratify)
    if d.val_dataset:
        val = build(d.val_dataset, DATASETS, "data.val_dataset")
    if d.test_dataset:
        test = build(d.test_dataset, DATASETS, "data.test_dataset")
    return Data(train, val, test, getattr(dataset, "num_classes", None), getattr(dataset, "classes", None))


def build_loaders(cfg: Config, data: Data) -> dict[str, Any]:
    from torchkiln.data.loaders import make_loader
    from torchkiln.engine import distributed

    d = cfg.data
    common = dict(num_workers=d.num_workers, pin_memory=d.pin_memory, persistent_workers=d.persistent_workers,
                  prefetch_factor=d.prefetch_factor, seed=cfg.seed,
                  rank=distributed.rank(), world_size=distributed.world_size())  # DDP: one shard per rank
    loaders = {"train": make_loader(data.train, d.batch_size, train=True, shuffle=d.shuffle,
                                    drop_last=d.drop_last, **common)}
    for split in ("val", "test"):
        ds = getattr(data, split)
        if ds is not None:
            loaders[split] = make_loader(ds, d.eval_batch_size or d.batch_size, train=False, **common)
    return loaders


def num_classes_of(cfg: Config, data: Data | None) -> int | None:
    if "num_classes" in cfg.model.args:
        return int(cfg.model.args["num_classes"])
    return data.num_classes if data is not None else None


def build_model(cfg: Config, num_classes: int | None = None) -> nn.Module:
    _register_builtins()
    args = dict(cfg.model.args)
    factory = MODELS.get(cfg.model.type, "model.type")
    extra = {}
    if num_classes is not None and "num_classes" not in args:
        import inspect

        if "num_classes" in inspect.signature(factory).parameters:
            extra["num_classes"] = num_classes
    return build(cfg.model, MODELS, "model", **extra)


def build_loss(cfg: Config, task) -> nn.Module:
    from torchkiln.losses import WeightedSum

    if cfg.loss is None:
        return build(Component(type=task.default_loss), LOSSES, "loss")
    if isinstance(cfg.loss, list):
        losses = [build(Component(type=c.type, args=c.args), LOSSES, f"loss.{i}") for i, c in enumerate(cfg.loss)]
        return WeightedSum(losses, [c.weight for c in cfg.loss])
    return build(cfg.loss, LOSSES, "loss")


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """Split parameters by `optimizer.groups` patterns (LR multipliers) and `optimizer.no_decay`."""
    o = cfg.optimizer
    base_lr = o.args.get("lr")
    base_wd = o.args.get("weight_decay")
    names_in_use = set()
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    norm_params = {f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules() if isinstance(m, norm_types)
                   for pn, _ in m.named_parameters(recurse=False)}

    def exempt(name: str) -> bool:
        for part in o.no_decay:
            if part == "norm" and name in norm_params:
                return True
            if part == "bias" and name.endswith("bias"):
                return True
            if part not in ("norm", "bias") and part in name:
                return True
        return False

    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        spec_idx = next((i for i, g in enumerate(o.groups) if fnmatch.fnmatchcase(name, g.params)), None)
        if spec_idx is not None:
            names_in_use.add(spec_idx)
        no_decay = exempt(name)
        key = (spec_idx, no_decay)
        if key not in groups:
            g: dict[str, Any] = {"params": []}
            if spec_idx is not None:
                spec = o.groups[spec_idx]
                if base_lr is None:
                    raise ConfigError("optimizer.groups: lr_mult needs optimizer.args.lr")
                g["lr"] = base_lr * spec.lr_mult
                if spec.weight_decay is not None:
                    g["weight_decay"] = spec.weight_decay
            if no_decay:
                g["weight_decay"] = 0.0
            elif base_wd is not None and "weight_decay" not in g:
                g["weight_decay"] = base_wd
            groups[key] = g
        groups[key]["params"].append(p)
    for i, g in enumerate(o.groups):
        if i not in names_in_use:
            names = [n for n, _ in model.named_parameters()]
            raise ConfigError(f"optimizer.groups.{i}.params: pattern '{g.params}' matches no parameter"
                              f"{did_you_mean(g.params, names)}")
    return list(groups.values())


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    params: Any = param_groups(model, cfg) if (cfg.optimizer.groups or cfg.optimizer.no_decay) else \
        [p for p in model.parameters() if p.requires_grad]
    comp = Component(type=cfg.optimizer.type, args=cfg.optimizer.args)
    return build(comp, OPTIMIZERS, "optimizer", params=params)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, batches_per_epoch: int) -> tuple[Any, dict]:
    """The torch scheduler and the Trainer keyword arguments that say how to drive it."""
    s = cfg.scheduler
    if s is None:
        return None, {}
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.trainer.accumulate)
    args = dict(s.args)
    if s.type == "OneCycleLR" and "total_steps" not in args and "epochs" not in args:
        args["total_steps"] = cfg.trainer.epochs * steps_per_epoch
    scheduler = build(Component(type=s.type, args=args), SCHEDULERS, "scheduler", optimizer=optimizer)
    warmup = 0
    if s.warmup is not None:
        warmup = s.warmup.steps if s.warmup.steps is not None else s.warmup.epochs * steps_per_epoch
    kwargs = {
        "scheduler_interval": s.interval,
        "scheduler_fractional_epochs": s.unit == "epoch",
        "warmup_steps": warmup,
        "warmup_start": s.warmup.start_factor if s.warmup else 0.01,
    }
    return scheduler, kwargs
