"""Config -> objects. Names are resolved (and their arguments checked) before anything heavy runs."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.config.schema import Component, Config, to_plain
from torchkiln.errors import ConfigError, did_you_mean
from torchkiln.registry import (
    CALLBACKS,
    DATASETS,
    LOSSES,
    MODELS,
    OPTIMIZERS,
    SCHEDULERS,
    build,
    check_args,
    construct,
    load_builtins,
)


def check_components(cfg: Config) -> None:
    """Every name resolves and every argument is accepted: a typo fails here, not mid-run."""
    load_builtins()
    from torchkiln.metrics import check_metric_specs
    from torchkiln.tasks import build_task

    task = build_task(cfg.task)
    check_model_config(cfg)
    for where, comp, reg in _components(cfg):
        factory = reg.get(comp.type, f"{where}.type")
        skip = ("params",) if reg is OPTIMIZERS else ("optimizer",) if reg is SCHEDULERS else ()
        check_args(factory, comp.args, f"{where}.args", skip=skip)
    specs = [m if isinstance(m, str) else m.model_dump() for m in cfg.metrics]
    check_metric_specs(specs, kind=getattr(task, "metric_kind", None))
    _check_metrics_fit_task(task, specs)
    from torchkiln.data.collate import COLLATES
    from torchkiln.data.transforms import check_transforms

    check_transforms(cfg.data.transforms, boxes=getattr(task, "metric_kind", None) == "detection")
    _check_sampler(task, cfg.data.sampler)
    if cfg.data.collate is not None:
        COLLATES.get(cfg.data.collate.type, "data.collate.type")
    if cfg.scheduler is not None and cfg.scheduler.type == "ReduceLROnPlateau" and cfg.scheduler.interval == "step":
        raise ConfigError("scheduler.interval: ReduceLROnPlateau needs the monitored metric, which exists only"
                          " after validation; use interval: epoch (or leave it out)")


def _check_sampler(task: Any, spec: Any) -> None:
    """`data.sampler.args.head` names a head of a multihead task."""
    from torchkiln.data.build import sampler_head
    from torchkiln.tasks import MultiHeadTask

    kind, head = sampler_head(spec)
    if head is None:
        return
    where = "data.sampler.args.head"
    if kind != "balanced":
        raise ConfigError(f"{where}: only the balanced sampler takes a head; set data.sampler.type: balanced")
    if not isinstance(task, MultiHeadTask):
        raise ConfigError(f"{where}: the {task.name} task has no heads; use data.sampler: balanced")
    task.check_head(head, where)


def _check_metrics_fit_task(task: Any, specs: list[Any]) -> None:
    """A metric named for another kind of task (mrr on classification) fails here, before any
    data is read. The class count is not known yet: a stand-in is used, and only the config's own
    mistakes (ConfigError) are reported; anything else waits for the real build."""
    from torchkiln.metrics import ClassCountError

    try:
        task.build_metrics(specs, 1000)
    except ClassCountError:
        pass
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - judged again with the real class count when the run is built
        pass


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
    for i, c in enumerate(cfg.callbacks):
        yield f"callbacks.{i}", c, CALLBACKS


@dataclass
class Data:
    train: Any
    val: Any | None
    test: Any | None
    num_classes: int | None
    class_names: list[str] | None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason), data.on_error: skip
    normalization: Any = None  # data/normalize.py's Standardization, with data.normalize


def build_data(cfg: Config, splits: tuple[str, ...] = ("train", "val", "test"),
               normalization: dict[str, Any] | None = None) -> Data:
    from torchkiln.data.build import build_data as _build_data

    load_builtins()
    return _build_data(cfg, Data, normalization)


def build_loaders(cfg: Config, data: Data) -> dict[str, Any]:
    from torchkiln.data.build import build_loaders as _build_loaders

    return _build_loaders(cfg, data)


def num_classes_of(cfg: Config, data: Data | None, task: Any | None = None) -> int | None:
    """model.args.num_classes when given (None: taken from the data), else the data's class count;
    for a class task (`task`), a given count below the data's is refused (targets out of range)."""
    given = cfg.model.args.get("num_classes")
    if given is None:
        return data.num_classes if data is not None else None
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise ConfigError(f"model.args.num_classes: expected a positive integer (or leave it out to take the"
                          f" class count from the data); found {given!r}")
    have = data.num_classes if data is not None else None
    classes = getattr(task, "metric_kind", None) in ("multiclass", "multilabel")
    if classes and isinstance(have, int) and not isinstance(have, bool) and given < have:
        raise ConfigError(f"model.args.num_classes: {given}, but the data has {have} classes (targets up to"
                          f" {have - 1}); set {have}, or leave it out to take the class count from the data")
    return given


def check_model_config(cfg: Config) -> None:
    """Before anything heavy: no hub downloads, and the pretrained file exists."""
    from torchkiln.models.backbones import HUB_HINT, hub_request

    m = cfg.model
    if isinstance(m.pretrained, bool):
        if m.pretrained:
            raise ConfigError(f"model.pretrained: true would download weights; {HUB_HINT}")
    elif m.pretrained is not None and not Path(m.pretrained).is_file():
        raise ConfigError(f"model.pretrained: {m.pretrained}: file not found (give a .safetensors, .pth"
                          f" or torchkiln .ckpt file)")
    key = hub_request(m.type, m.args)
    if key is not None:
        raise ConfigError(f"model.args.{key}: {m.type} would download pretrained weights; {HUB_HINT}")


def build_model(cfg: Config, num_classes: int | None = None, pretrained: bool = True) -> nn.Module:
    """The model, with `model.pretrained` loaded (unless `pretrained` is False)."""
    load_builtins()
    args = dict(cfg.model.args)
    if args.get("num_classes", 0) is None:  # num_classes: null stands for "from the data"
        del args["num_classes"]
    factory = MODELS.get(cfg.model.type, "model.type")
    extra = {}
    if num_classes is not None and "num_classes" not in args:
        import inspect

        try:
            takes = "num_classes" in inspect.signature(factory).parameters
        except (TypeError, ValueError):
            takes = False
        if takes:
            extra["num_classes"] = num_classes
    model = build(Component(type=cfg.model.type, args=args), MODELS, "model", **extra)
    if pretrained and isinstance(cfg.model.pretrained, str):
        from torchkiln.models import find_head, load_pretrained

        head = find_head(model, cfg.model.head, required=cfg.model.head is not None)
        load_pretrained(model, cfg.model.pretrained, strict=cfg.model.strict, head=head,
                        reset_head=cfg.model.reset_head)
    return model


def build_freezer(cfg: Config, model: nn.Module):
    """A Freezer for `model.freeze` (in the state of the first epoch), or None."""
    if cfg.model.freeze is None:
        return None
    from torchkiln.models import make_freezer

    freezer = make_freezer(model, cfg.model.freeze, cfg.model.unfreeze_at_epoch, head=cfg.model.head)
    freezer.set_epoch(0)
    return freezer


def build_loss(cfg: Config, task, labels=None, num_classes: int | None = None) -> nn.Module:
    """The task makes the loss from the config's specs; `labels()` gives the training targets (for 'balanced')."""
    if cfg.loss is None:
        specs = None
    elif isinstance(cfg.loss, list):
        specs = [c.model_dump() for c in cfg.loss]
    else:
        specs = [{"type": cfg.loss.type, "args": cfg.loss.args}]
    return task.make_loss(specs, labels, num_classes)


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
    for name, p in model.named_parameters():  # frozen ones too: they get no gradient, so no update
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
    # Every parameter, frozen ones too: they get no gradient, so the optimizer skips them until
    # unfrozen, and the optimizer's state has the same shape whatever the epoch (resume-safe).
    params: Any = param_groups(model, cfg) if (cfg.optimizer.groups or cfg.optimizer.no_decay) else \
        list(model.parameters())
    comp = Component(type=cfg.optimizer.type, args=cfg.optimizer.args)
    return build(comp, OPTIMIZERS, "optimizer", params=params)


def _keep_lr_mults(args: dict[str, Any], optimizer: torch.optim.Optimizer, base_lr: float | None) -> None:
    """OneCycleLR and CyclicLR set absolute LRs; scale a scalar max_lr/base_lr per param group so
    that `optimizer.groups` lr_mult still holds under them."""
    if not base_lr or len(optimizer.param_groups) < 2:
        return
    mults = [g["lr"] / base_lr for g in optimizer.param_groups]
    if all(m == 1.0 for m in mults):
        return
    for key in ("max_lr", "base_lr"):
        if isinstance(args.get(key), (int, float)):
            args[key] = [args[key] * m for m in mults]


def _plateau_mode(args: dict[str, Any], mode: str, monitor: str | None) -> None:
    """ReduceLROnPlateau watches the monitored metric: its `mode` is the monitor's (torch's own
    default, min, would cut the LR while an accuracy improves); a contradicting mode is refused."""
    given = args.get("mode")
    if given is None:
        args["mode"] = mode
    elif given != mode:
        raise ConfigError(
            f"scheduler.args.mode: '{given}' contradicts trainer.monitor {monitor} (mode {mode}); leave"
            f" it out (ReduceLROnPlateau then follows the monitor's mode)")


def _check_one_cycle_length(args: dict[str, Any], needed: int, epochs: int) -> None:
    """OneCycleLR fails at the first step past its length: a length set by hand that is shorter
    than the run is refused before anything runs."""
    if "total_steps" in args:
        key, total = "total_steps", args["total_steps"]
    else:
        key, total = "epochs", args["epochs"] * args.get("steps_per_epoch", 0)
    if isinstance(total, int) and total < needed:
        raise ConfigError(
            f"scheduler.args.{key}: OneCycleLR is planned for {total} steps but trainer.epochs={epochs}"
            f" takes {needed}; leave out total_steps/epochs so torchkiln plans it from trainer.epochs"
            f" (and re-plans it when a run is continued), or make it at least {needed} steps")


def _scheduler_args(args: dict[str, Any], optimizer: torch.optim.Optimizer, where: str) -> dict[str, Any]:
    """Scheduler arguments that are not plain data in a config: `lr_lambda` (LambdaLR,
    MultiplicativeLR) as import paths of functions, one or one per param group; `schedulers`
    (SequentialLR, ChainedScheduler) as a list of {type, args}, built on the same optimizer."""
    from torchkiln.registry import import_path

    out = dict(args)
    fn = out.get("lr_lambda")
    if isinstance(fn, str):
        out["lr_lambda"] = import_path(fn, f"{where}.lr_lambda")
    elif isinstance(fn, list) and all(isinstance(f, str) for f in fn):
        out["lr_lambda"] = [import_path(f, f"{where}.lr_lambda.{i}") for i, f in enumerate(fn)]
    inner = out.get("schedulers")
    if isinstance(inner, list) and all(isinstance(c, dict) and "type" in c for c in inner):
        built = []
        for i, c in enumerate(inner):
            sub = f"{where}.schedulers.{i}"
            factory = SCHEDULERS.get(c["type"], f"{sub}.type")
            sub_args = _scheduler_args(dict(c.get("args") or {}), optimizer, f"{sub}.args")
            check_args(factory, sub_args, f"{sub}.args", skip=("optimizer",))
            built.append(construct(factory, {"optimizer": optimizer, **sub_args}, sub, c["type"]))
        out["schedulers"] = built
    return out


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, batches_per_epoch: int,
                    mode: str | None = None, monitor: str | None = None) -> tuple[Any, dict]:
    """The torch scheduler and the Trainer keyword arguments that say how to drive it; `mode`
    (min/max) and `monitor` are the run's, which ReduceLROnPlateau follows."""
    s = cfg.scheduler
    if s is None:
        return None, {}
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.trainer.accumulate)
    args = dict(s.args)
    if s.type == "ReduceLROnPlateau" and mode is not None:
        _plateau_mode(args, mode, monitor)
    if s.type == "OneCycleLR":
        per_epoch = 1 if s.interval == "epoch" else steps_per_epoch
        needed = cfg.trainer.epochs * per_epoch
        if "total_steps" not in args and "epochs" not in args:
            args["total_steps"] = needed  # planned from the epochs: re-planned when they change
        else:
            _check_one_cycle_length(args, needed, cfg.trainer.epochs)
    if s.type in ("OneCycleLR", "CyclicLR"):
        _keep_lr_mults(args, optimizer, cfg.optimizer.args.get("lr"))
    args = _scheduler_args(args, optimizer, "scheduler.args")
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


def build_loggers(cfg: Config, run_dir: Path, model: nn.Module | None = None,
                  class_names: list[str] | None = None) -> list[Any]:
    """The loggers `cfg.logging` asks for (a validated Config), writing into `run_dir`."""
    from torchkiln.loggers import auto_none, run_loggers

    lg, plain = cfg.logging, to_plain(cfg)
    loggers = run_loggers(run_dir, model, class_names, csv=lg.csv, tensorboard=lg.tensorboard, plots=lg.plots,
                          histograms=lg.histograms, images=lg.images, images_every=lg.images_every,
                          config=plain, log_file=False, summary=False)  # the CLI keeps its own
    if lg.wandb is not None:
        from torchkiln.loggers.wandb import WandbLogger

        w = lg.wandb
        loggers.append(WandbLogger(run_dir, project=w.project, mode=w.mode, entity=w.entity, name=w.name,
                                   tags=w.tags, config=plain, images=lg.images, class_names=class_names,
                                   images_every=auto_none(lg.images_every)))
    return loggers


def data_stats(cfg: Config, out_dir: Path | None = None, max_images: int = 2000) -> tuple[dict[str, Any], Path]:
    """`kiln data stats`: statistics of the configured training split as stored (without
    data.normalize); writes stats.json and class_histogram.png into `out_dir`."""
    from torchkiln.data.detection.stats import detection_stats
    from torchkiln.data.detection.transforms import is_detection
    from torchkiln.data.stats import describe_split, write_stats
    from torchkiln.tasks import build_task

    check_components(cfg)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"normalize": None})})  # the stored values
    data = build_data(cfg)
    if is_detection(data.train):  # box counts from the annotations; no image is decoded
        stats = detection_stats(data.train, data.class_names)
    else:
        stats = describe_split(data.train, data.class_names, build_task(cfg.task), max_images, cfg.seed)
    out_dir = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / cfg.name / "data_stats"
    write_stats(stats, out_dir)
    return stats, out_dir


# The trainer settings that the command uses itself rather than handing to make_trainer.
NOT_TRAINER_SETTINGS = {"deterministic", "threads", "dist_timeout"}


def trainer_settings(cfg: Config, monitor: str, mode: str) -> dict[str, Any]:
    """`make_trainer`'s keywords from the config: the `trainer` section under its own names (plus
    the run's resolved monitor and mode, this rank's device and the logging cadence)."""
    from torchkiln.engine import distributed

    settings = {k: v for k, v in cfg.trainer.model_dump().items() if k not in NOT_TRAINER_SETTINGS}
    settings.update(monitor=monitor, mode=mode, device=distributed.rank_device(cfg.trainer.device),
                    log_every_n_steps=cfg.logging.every_n_steps)
    return settings


def build_callbacks(cfg: Config) -> list[Any]:
    """The config's `callbacks`, built in order; each must be a torchkiln Callback."""
    from torchkiln.engine.callbacks import Callback

    built = []
    for i, comp in enumerate(cfg.callbacks):
        cb = build(comp, CALLBACKS, f"callbacks.{i}")
        if not isinstance(cb, Callback):
            raise ConfigError(f"callbacks.{i}.type: {comp.type} built a {type(cb).__name__}, not a"
                              " torchkiln.Callback (subclass torchkiln.Callback and override its moments)")
        built.append(cb)
    return built
