"""`kiln train` (and `kiln config check`): config -> built parts -> Trainer, inside a run directory.
`--devices N` starts N workers that each come back here; `--folds` is `commands/kfold.py`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from torchkiln.commands import rank0
from torchkiln.commands.logs import console, held_log
from torchkiln.config.load import (
    apply_overrides,
    config_errors_from,
    read_file,
    resolve,
)
from torchkiln.config.schema import Config, to_plain
from torchkiln.errors import CheckpointError, ConfigError
from torchkiln.inference.card import (
    CLASS_NAMES_KEY,
    INPUT_KEY,
    NORMALIZATION_KEY,
    input_info,
    plain_names,
)
from torchkiln.rundir import (
    CONFIG,
    find_checkpoint,
    load_resumable,
    plan_run_dir,
    run_dir_of,
)

log = logging.getLogger("torchkiln")
FINDER_START = 2  # the batch-size finder's first size (and what `auto` builds with before it is resolved)
FINDER_MAX = 4096  # its default bound (a CPU, where nothing runs out, stops here or at the data's size)


# ------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    """`kiln train`: one run, new or resumed, in this process or in N (--devices N)."""
    console(args.quiet)
    from torchkiln.engine import distributed

    if getattr(args, "memory_snapshot", None):  # --memory-snapshot N is the setting trainer.memory_snapshot
        args.overrides = [*args.overrides, f"trainer.memory_snapshot={args.memory_snapshot}"]
    distributed.quiet_other_ranks()  # a worker of rank > 0 logs warnings and errors only
    if not args.resume and distributed.restart_count() > 0:  # a restarted worker group
        args.resume = _restart_target(args)
    cfg, resume, state, source = _config_of(args)
    if args.devices > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(args, cfg, resume)
    from torchkiln.engine.state import StopRequested

    try:
        train(cfg, resume=resume, progress=not args.quiet, state=state, source=source)
    except StopRequested as stop:
        from torchkiln.commands.slurm import requeue_after

        requeue_after(stop.signum)  # SLURM's warning signal: the checkpoint is written; requeue the job
        return 128 + stop.signum
    finally:
        distributed.destroy()
    return 0


def _config_of(args: argparse.Namespace) -> tuple[Config, Path | None, dict[str, Any] | None, str]:
    """(config, checkpoint, its content, config file): on resume the run's own config.yaml is the base."""
    from torchkiln.config.load import default_config_path, load_checked, load_config

    if args.resume:
        base = load_config(args.config, args.overrides) if args.resume == "auto" else None
        found = resume_config(args.resume, base, args.overrides)
        if found is not None:
            cfg, resume, state = found
            if args.config and args.resume != "auto":
                log.warning("-c %s is not used: a resume continues its run's own %s (overrides still apply;"
                            " to train with this config, leave --resume out)", args.config, run_dir_of(resume) / CONFIG)
            log.info("resuming from %s", resume)
            return cfg, resume, state, str(run_dir_of(resume) / CONFIG)
        log.info("--resume auto: no checkpoint of '%s' under %s yet; starting a new run",
                 base.name, base.output_dir)
    return load_checked(args.config, args.overrides), None, None, str(args.config or default_config_path())


def _launch(args: argparse.Namespace, cfg: Config, resume: Path | None) -> int:
    """`kiln train --devices N`: validate here once, plan the run directory, start N workers."""
    from torchkiln.config.build import check_components
    from torchkiln.engine import distributed

    if cfg.trainer.strategy == "dp":
        raise ConfigError("trainer.strategy: dp is one process over several GPUs; with --devices use ddp or auto")
    check_components(cfg)
    import torch

    gpus = torch.cuda.device_count() if cfg.trainer.device != "cpu" else 0
    if 0 < gpus < args.devices:
        raise ConfigError(f"--devices {args.devices}: only {gpus} GPU(s) visible; use --devices {gpus}"
                          f" (one process per GPU) or trainer.device=cpu")
    # Planned here, made by the workers' rank 0 once the run is built (nothing before that).
    run_dir = run_dir_of(resume) if resume is not None else plan_run_dir(cfg)
    worker = (["--debug"] if args.debug else []) + ["train"]
    worker += ["-c", args.config] if args.config else []
    worker += ["--resume", str(resume)] if resume is not None else []
    worker += ["-q"] if args.quiet else []
    log.info("starting %d processes; run directory %s", args.devices, run_dir)
    return distributed.launch(worker + list(args.overrides), args.devices, args.max_restarts, str(run_dir))


def _restart_target(args: argparse.Namespace) -> str | None:
    """After an elastic restart, continue from the run's newest checkpoint (if it wrote one)."""
    from torchkiln.config.load import load_config
    from torchkiln.engine import distributed

    target = os.environ.get(distributed.RUN_DIR_ENV) or "auto"
    try:
        found = find_checkpoint(target, load_config(args.config, args.overrides))
    except CheckpointError:
        return args.resume
    if found is None:  # the group died before its first checkpoint: start again
        return args.resume
    log.info("restart %d: resuming from %s", distributed.restart_count(), found[0])
    return str(found[0])


@contextlib.contextmanager
def stop_on_signals(trainer):
    """First SIGINT/SIGTERM/SIGUSR1: finish the step, checkpoint, stop. A second Ctrl-C exits at
    once. SIGUSR1 is SLURM's warning before the time limit (`--signal=USR1@90`): see commands/slurm.py."""
    previous = {}

    def handler(signum, frame):
        if trainer.stop_requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.request_stop(signum)  # before logging: a second signal may arrive inside the log call
        log.warning("received %s: finishing this step and writing a checkpoint (Ctrl-C again to quit now)",
                    signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


# ------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------
def resume_config(target: str, cfg: Config | None, overrides: list[str]
                  ) -> tuple[Config, Path, dict[str, Any]] | None:
    """On resume the run's own config.yaml is the base; command-line overrides still apply.

    None when `target` is auto and this config's name has no run with a checkpoint yet.
    """
    found = find_checkpoint(target, cfg)
    if found is None:
        return None
    ckpt, state = found
    run_cfg = run_dir_of(ckpt) / CONFIG
    if not run_cfg.is_file():
        raise CheckpointError(f"{ckpt}: its run directory has no config.yaml to resume with")
    data = apply_overrides(read_file(run_cfg), overrides)
    return resolve(data, str(run_cfg)), ckpt, state


def train(cfg: Config, resume: Path | None = None, progress: bool = True,
          state: dict[str, Any] | None = None, source: str | None = None,
          loggers: list[Any] = (), batches: Any | None = None) -> tuple[Path, dict[str, Any]]:
    """Validate, build, train; returns the run directory and the summary.

    Everything is checked and built before the run directory is made: a config that cannot run
    leaves nothing behind. With `resume` (a checkpoint path; `state` its loaded content, if
    already loaded) the run continues in that checkpoint's run directory. `source` (the config
    file) prefixes config errors; `loggers` are added to the run's own. `batches(cfg, data, loaders)`
    gives the loaders to run on instead (commands/devrun.py: a few batches, the same batches).
    """
    with config_errors_from(source):
        return _train(cfg, resume, progress, state, loggers, batches)


def _train(cfg: Config, resume: Path | None, progress: bool, state: dict[str, Any] | None,
           extra_loggers: list[Any], batches: Any | None = None) -> tuple[Path, dict[str, Any]]:
    from torchkiln.config.build import check_components

    check_components(cfg)
    if cfg.logging.wandb is not None:
        from torchkiln.loggers.wandb import require_wandb

        require_wandb()
    import torch

    from torchkiln.engine import distributed
    from torchkiln.engine.device import resolve_device
    from torchkiln.engine.step import check_precision

    distributed.init_from_env(cfg.trainer.device, cfg.trainer.dist_timeout)
    check_precision(cfg.trainer.precision, resolve_device(distributed.rank_device(cfg.trainer.device)))
    with held_log(distributed.is_rank0()) as earlier:
        if resume is not None:
            resume = Path(resume)
            state = state if state is not None else load_resumable(resume)
        cfg = resolve_auto(cfg)  # data.batch_size: auto -> the largest batch that fits (every rank alike)
        trainer, loaders, data = build_parts(cfg, progress=progress, pretrained=resume is None,
                                             normalization=stored_normalization(state))
        loaders = batches(cfg, data, loaders) if batches is not None else loaders
        _log_batch_size(cfg)
        if state is not None:
            _load_state(cfg, trainer, state, resume)
        run_dir = rank0.run_dir(cfg, resume)
    with rank0.run_log(run_dir, earlier):
        log.info("run directory %s", run_dir)
        open_run_dir(cfg, trainer, data, run_dir, extra_loggers)
        rank0.write_config(run_dir, cfg)
        torch.set_float32_matmul_precision("high")
        summary = _fit(cfg, trainer, loaders, state, run_dir)
        distributed.barrier()
        best = summary["best"]
        log.info("done: best %s %.4f at epoch %s; run directory %s", summary["monitor"],
                 best if best is not None else float("nan"), summary["best_epoch"], run_dir)
    return run_dir, summary


def _load_state(cfg: Config, trainer: Any, state: dict[str, Any], resume: Path) -> None:
    """A checkpoint into the built Trainer, checked before anything in the run is rewritten."""
    from torchkiln.engine import dcp

    try:
        if state.get(dcp.SHARDED):  # an FSDP run's checkpoint: its shards beside it
            dcp.load(trainer, state, resume)
        else:
            trainer.load_state_dict(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{resume}: {exc}") from None
    loop = state["loop"]
    if loop.get("stopped_early") or loop.get("epoch", 0) >= cfg.trainer.epochs:
        log.info("%s: this run already finished (%d epochs); to train longer, resume with"
                 " trainer.epochs=N", resume, loop.get("epoch", 0))


def _fit(cfg: Config, trainer: Any, loaders: dict[str, Any], state: dict[str, Any] | None,
         run_dir: Path) -> dict[str, Any]:
    """Train until done or stopped by a signal; summary.json is written either way."""
    from torchkiln.engine import distributed
    from torchkiln.engine.state import StopRequested

    try:
        with stop_on_signals(trainer), distributed.collective_errors():
            summary = trainer.fit(loaders["train"], loaders.get("val"), resume=state)
    except StopRequested as stop:
        rank0.write_summary(cfg, run_dir, trainer.summary(), trainer.loop.history)
        log.warning("stopped by %s; checkpoint written: %s. Resume with: kiln train --resume %s",
                    signal.Signals(stop.signum).name, stop.checkpoint, run_dir)
        raise
    except (Exception, KeyboardInterrupt) as exc:  # the run's summary says how it ended
        from torchkiln.commands.logs import ending

        try:
            rank0.write_summary(cfg, run_dir, {**trainer.summary(), "error": ending(exc)}, trainer.loop.history)
        except Exception as failed:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("summary.json not written: %s", failed)
        raise
    rank0.write_summary(cfg, run_dir, summary, trainer.loop.history)
    return summary


def check(cfg: Config, source: str | None = None) -> list[str]:
    """`kiln config check`: build every part of the run (data, model, loss, optimizer, schedule,
    metrics, monitor) as `kiln train` would, write nothing, and describe what was built."""
    from torchkiln.config.build import check_components

    with config_errors_from(source):
        check_components(cfg)
        trainer, loaders, data = build_parts(cfg, progress=False)
    sizes = ", ".join(f"{len(loaders[k].dataset)} {k}" for k in ("train", "val", "test") if k in loaders)
    classes = f", {data.num_classes} classes" if data.num_classes else ""
    params = sum(p.numel() for p in trainer.raw_model.parameters())
    sched = trainer.schedule
    lines = [
        f"data       {cfg.data.dataset.type}: {sizes} samples{classes}, {len(loaders['train'])} batches per epoch",
        f"task       {trainer.task.name}",
        f"model      {cfg.model.type}: {params:,} parameters",
        f"loss       {type(trainer.loss_fn).__name__}",
        f"optimizer  {type(trainer.optimizer).__name__} ({len(trainer.optimizer.param_groups)} param group(s))",
        f"scheduler  {type(sched.scheduler).__name__ + ' (per ' + sched.interval + ')' if sched.scheduler else 'none'}",
        f"metrics    {', '.join(trainer.val_metrics.keys(keep_base=True)) if trainer.val_metrics else 'none'}",
        f"monitor    {trainer.monitor.name} ({trainer.monitor.mode})",
    ]
    if data.skipped:
        lines.append(f"skipped    {len(data.skipped)} broken input(s) (data.on_error: skip)")
    if cfg.data.batch_size == "auto":
        lines.append(f"batch size auto: kiln train finds it first (the batches above are of {FINDER_START})")
    return lines


def stored_normalization(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `data.normalize` statistics a checkpoint carries (resume and `kiln test` reuse them)."""
    config = state.get("config") if isinstance(state, dict) else None
    return config.get(NORMALIZATION_KEY) if isinstance(config, dict) else None


def build_trainer(cfg: Config, run_dir: Path | None, progress: bool = True, pretrained: bool = True,
                  normalization: dict[str, Any] | None = None):
    """The Trainer and loaders a config describes, writing into `run_dir` (None: nothing written);
    `normalization`: a run's stored `data.normalize` statistics (else fitted on the training split)."""
    trainer, loaders, data = build_parts(cfg, progress=progress, pretrained=pretrained,
                                         normalization=normalization)
    if run_dir is not None:
        open_run_dir(cfg, trainer, data, Path(run_dir))
    return trainer, loaders


def open_run_dir(cfg: Config, trainer: Any, data: Any, run_dir: Path, extra_loggers: list[Any] = ()) -> None:
    """Point a built Trainer at its run directory; rank 0 gets the run's loggers and files."""
    trainer.use_run_dir(run_dir, rank0.run_files(cfg, trainer.raw_model, data, run_dir) + list(extra_loggers))


def build_parts(cfg: Config, progress: bool = True, pretrained: bool = True,
                normalization: dict[str, Any] | None = None):
    """(Trainer, loaders, data) for a config; nothing is written anywhere. Every mistake the
    config can still hold once its names are checked (data, arguments, the monitor) shows here."""
    import torch

    from torchkiln.config.build import (
        build_callbacks,
        build_data,
        build_freezer,
        build_loaders,
        build_loss,
        build_model,
        build_optimizer,
        build_scheduler,
        num_classes_of,
        trainer_settings,
    )
    from torchkiln.data.targets import dataset_targets
    from torchkiln.engine import distributed
    from torchkiln.engine.settings import make_trainer
    from torchkiln.seeding import seed_everything
    from torchkiln.tasks import build_task

    cfg = placeholder(cfg)  # data.batch_size: auto is resolved by `kiln train`; building needs a number
    if cfg.trainer.threads is not None:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg.seed, deterministic=cfg.trainer.deterministic)
    data = build_data(cfg, normalization=normalization)
    task = build_task(cfg.task)
    task.check_class_names(data.class_names)
    loaders = build_loaders(cfg, data)
    num_classes = num_classes_of(cfg, data, task)
    if data.normalization is not None and data.normalization.targets is not None:
        task.set_target_scale(*data.normalization.targets)
    model = build_model(cfg, task.num_outputs(num_classes), pretrained=pretrained)
    freezer = build_freezer(cfg, model)
    loss = build_loss(cfg, task, labels=lambda: dataset_targets(data.train), num_classes=num_classes)
    optimizer = build_optimizer(cfg, model)
    metrics = task.build_metrics([m if isinstance(m, str) else m.model_dump() for m in cfg.metrics], num_classes)
    t, has_val = cfg.trainer, loaders.get("val") is not None
    monitor = t.monitor or task.default_monitor(list(metrics.keys()), has_val)
    mode = t.mode or task.monitor_mode(monitor)
    scheduler, sched_kwargs = build_scheduler(cfg, optimizer, len(loaders["train"]), mode=mode, monitor=monitor)
    resolved = to_plain(cfg)
    if num_classes is not None and "num_classes" in _parameters(model) and cfg.model.args.get("num_classes") is None:
        resolved["model"]["args"]["num_classes"] = num_classes  # so the checkpoint rebuilds the model
    if data.normalization is not None:
        resolved[NORMALIZATION_KEY] = data.normalization.to_dict()  # checkpoints carry the statistics
    resolved[CLASS_NAMES_KEY] = plain_names(data.class_names)  # and the class names, for `kiln predict` and export
    from torchkiln.probe import probe

    inputs = probe(model, loss, task, loaders["train"])
    if isinstance(inputs, torch.Tensor):  # one sample's shape: the predictor tells a sample from a batch by it
        resolved[INPUT_KEY] = input_info(inputs)
    trainer = make_trainer(
        model, optimizer, loss, task=task, metrics=metrics, scheduler=scheduler, freezer=freezer,
        callbacks=build_callbacks(cfg), **trainer_settings(cfg, monitor, mode), config=resolved,
        progress=progress and cfg.logging.progress and distributed.is_rank0(), **sched_kwargs,
    )
    trainer.resolve_monitor(has_val)
    return trainer, loaders, data


def _parameters(model) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(type(model).__init__).parameters)
    except (TypeError, ValueError):
        return set()


def _log_batch_size(cfg: Config) -> None:
    from torchkiln.engine import distributed

    b, world, k = cfg.data.batch_size, distributed.world_size(), cfg.trainer.accumulate
    log.info("global batch size %d = %d per process x %d process(es) x %d accumulation step(s)",
             b * world * k, b, world, k)


# ------------------------------------------------------------------------------------------
# data.batch_size: auto, and `kiln find-batch-size` (engine/batch_finder.py)
# ------------------------------------------------------------------------------------------
def with_batch_size(cfg: Config, size: int) -> Config:
    """`cfg` with `data.batch_size` set (the rest shared, unchanged)."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": int(size)})})


def find_batch_size(cfg: Config, *, mode: str = "binsearch", max_size: int = FINDER_MAX, margin: float = 0.1,
                    start: int = FINDER_START) -> Any:
    """Build the run as `kiln train` would (data, model, optimizer, precision, compile), then search."""
    from torchkiln.data.build import build_loaders
    from torchkiln.engine import distributed
    from torchkiln.engine.batch_finder import find_batch_size as search

    trainer, _, data = build_parts(with_batch_size(cfg, start), progress=False)

    def batch_of(size: int) -> Any:
        loader = build_loaders(with_batch_size(cfg, size), data)["train"]
        return next(iter(loader))

    samples = len(data.train) // distributed.world_size()
    log.info("batch-size finder (%s) on %s, precision %s, accumulate %d: from %d up to %d", mode,
             trainer.device, trainer.stepper.precision, trainer.stepper.accumulate, start, min(samples, max_size))
    return search(trainer, batch_of, samples, mode=mode, start=start, max_size=max_size, margin=margin)


def resolve_auto(cfg: Config) -> Config:
    """`data.batch_size: auto` -> the finder's answer (every rank the same), logged; else `cfg`."""
    if cfg.data.batch_size != "auto":
        return cfg
    result = find_batch_size(cfg)
    for line in result.lines():
        log.info("batch-size finder: %s", line)
    log.info("data.batch_size: auto -> %d (kiln find-batch-size; written to config.yaml)", result.size)
    return with_batch_size(cfg, result.size)


def placeholder(cfg: Config) -> Config:
    """A config whose batch size is still `auto` gets a concrete one for building (check, summary)."""
    return with_batch_size(cfg, FINDER_START) if cfg.data.batch_size == "auto" else cfg
