"""What `kiln train` and `kiln test` do: config -> objects -> Trainer, inside a run directory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from torchkiln.config.load import (
    apply_overrides,
    config_errors_from,
    dump_yaml,
    read_file,
    resolve,
    to_plain,
)
from torchkiln.config.schema import Config
from torchkiln.errors import CheckpointError, ConfigError

log = logging.getLogger("torchkiln")
CHECKPOINTS = "checkpoints"
NORMALIZATION = "normalization.json"  # data.normalize's statistics, in the run directory
NORMALIZATION_KEY = "normalization"  # ... and beside the resolved config in every checkpoint


# ------------------------------------------------------------------------------------------
# run directories
# ------------------------------------------------------------------------------------------
def plan_run_dir(cfg: Config) -> Path:
    """A new run directory's path (`output_dir/name/timestamp`), not yet made."""
    root = Path(cfg.output_dir) / cfg.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, i = root / stamp, 1
    while run_dir.exists():
        run_dir, i = root / f"{stamp}-{i}", i + 1
    return run_dir


def new_run_dir(cfg: Config) -> Path:
    run_dir = plan_run_dir(cfg)
    run_dir.mkdir(parents=True)
    return run_dir


def find_checkpoint(target: str, cfg: Config | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from, loaded (safely) and checked, or None for `auto` without runs.

    `auto`: the newest valid checkpoint of the newest run of this config's name; a damaged newest
    checkpoint is skipped with a warning. RUN_DIR: its newest valid checkpoint. CKPT: that file.
    """
    if target == "auto":
        if cfg is None:
            raise ConfigError("--resume auto needs a config to know the run name")
        root = Path(cfg.output_dir) / cfg.name
        runs = sorted((p for p in root.glob("*") if _candidates(p / CHECKPOINTS)), key=_run_order)
        if not runs:
            return None
        return _newest_valid(runs[-1] / CHECKPOINTS)
    path = Path(target)
    if path.is_dir():
        ckpt_dir = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
        if not _candidates(ckpt_dir):
            raise CheckpointError(f"{path}: no checkpoint found in {ckpt_dir}")
        return _newest_valid(ckpt_dir)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    return path, _load_resumable(path)


def _load_resumable(path: Path) -> dict[str, Any]:
    from torchkiln.engine.checkpoint import FORMAT, load_checkpoint

    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a torchkiln training checkpoint (plain weights hold no optimizer or loop"
            " state to resume; train from them with a new run instead)"
        )
    return state


def _newest_valid(ckpt_dir: Path) -> tuple[Path, dict[str, Any]]:
    skipped = []
    for ckpt in _candidates(ckpt_dir):
        try:
            state = _load_resumable(ckpt)
        except CheckpointError as exc:
            log.warning("skipping unusable checkpoint: %s", exc)
            skipped.append(ckpt.name)
            continue
        if skipped:
            log.warning("falling back to %s (newer but unusable: %s)", ckpt, ", ".join(skipped))
        return ckpt, state
    raise CheckpointError(f"{ckpt_dir}: no usable checkpoint ({', '.join(skipped)} all damaged);"
                          " resume from another run directory or start without --resume")


def _run_order(run: Path) -> tuple[str, int]:
    """Run directories are timestamps, `-N` added on a clash: order by time, then N."""
    m = re.fullmatch(r"(\d{8}-\d{6})-(\d+)", run.name)
    return (m.group(1), int(m.group(2))) if m else (run.name, 0)


def _candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints newest first: by time written; on a tie last.ckpt, then numbered, then best."""
    if not ckpt_dir.is_dir():
        return []
    rank = {"last.ckpt": 0, "best.ckpt": 2}
    files = list(ckpt_dir.glob("*.ckpt"))
    return sorted(files, key=lambda p: (-p.stat().st_mtime_ns, rank.get(p.name, 1), p.name))


def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent


# ------------------------------------------------------------------------------------------
# logging to the console and train.log
# ------------------------------------------------------------------------------------------
class _Held(logging.Handler):
    """Keeps the records logged while a run is built (before its directory exists) for train.log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_log(rank0: bool = True):
    """Collect the records of the build for train.log (rank 0's: other ranks keep their quieter level)."""
    from torchkiln.loggers.summary import at_least_info

    held = _Held()
    log.addHandler(held)
    level = at_least_info() if rank0 else log.level
    try:
        yield held.records
    finally:
        log.setLevel(level)
        log.removeHandler(held)


@contextlib.contextmanager
def file_log(run_dir: Path, earlier: list[logging.LogRecord] = ()):
    """train.log in `run_dir` for the run's records (`earlier`: those logged before it existed)."""
    from torchkiln.loggers.summary import at_least_info, train_log_handler

    handler = train_log_handler(run_dir / "train.log")
    for record in earlier:
        handler.handle(record)
    log.addHandler(handler)
    level = at_least_info()
    try:
        yield
    finally:
        log.setLevel(level)
        log.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def stop_on_signals(trainer):
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop. A second Ctrl-C exits at once."""
    previous = {}

    def handler(signum, frame):
        if trainer.stop_requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.request_stop(signum)  # before logging: a second signal may arrive inside the log call
        log.warning("received %s: finishing this step and writing a checkpoint (Ctrl-C again to quit now)",
                    signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
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
    run_cfg = run_dir_of(ckpt) / "config.yaml"
    if not run_cfg.is_file():
        raise CheckpointError(f"{ckpt}: its run directory has no config.yaml to resume with")
    data = apply_overrides(read_file(run_cfg), overrides)
    return resolve(data, str(run_cfg)), ckpt, state


def train(cfg: Config, resume: Path | None = None, progress: bool = True,
          state: dict[str, Any] | None = None, source: str | None = None,
          loggers: list[Any] = ()) -> tuple[Path, dict[str, Any]]:
    """Validate, build, train; returns the run directory and the summary.

    Everything is checked and built before the run directory is made: a config that cannot run
    leaves nothing behind. With `resume` (a checkpoint path; `state` its loaded content, if
    already loaded) the run continues in that checkpoint's run directory. `source` (the config
    file) prefixes config errors; `loggers` are added to the run's own.
    """
    with config_errors_from(source):
        return _train(cfg, resume, progress, state, loggers)


def _train(cfg: Config, resume: Path | None, progress: bool, state: dict[str, Any] | None,
           extra_loggers: list[Any]) -> tuple[Path, dict[str, Any]]:
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
    rank0 = distributed.is_rank0()
    check_precision(cfg.trainer.precision, resolve_device(distributed.rank_device(cfg.trainer.device)))
    with held_log(rank0) as earlier:
        if resume is not None:
            resume = Path(resume)
            state = state if state is not None else _load_resumable(resume)
        trainer, loaders, data = build_parts(cfg, progress=progress, pretrained=resume is None,
                                             normalization=stored_normalization(state))
        _log_batch_size(cfg)
        if state is not None:
            try:
                trainer.load_state_dict(state)  # checked before anything in the run is rewritten
            except CheckpointError as exc:
                raise CheckpointError(f"{resume}: {exc}") from None
            loop = state["loop"]
            if loop.get("stopped_early") or loop.get("epoch", 0) >= cfg.trainer.epochs:
                log.info("%s: this run already finished (%d epochs); to train longer, resume with"
                         " trainer.epochs=N", resume, loop.get("epoch", 0))
        # Rank duties: rank 0 makes the run directory (`kiln train --devices N` planned its path)
        # and sends its path to the others.
        if resume is not None:
            run_dir = run_dir_of(resume)
        elif os.environ.get(distributed.RUN_DIR_ENV):
            run_dir = Path(os.environ[distributed.RUN_DIR_ENV])
            if rank0:
                run_dir.mkdir(parents=True, exist_ok=True)
        else:
            run_dir = distributed.broadcast_object(new_run_dir(cfg) if rank0 else None)
    with file_log(run_dir, earlier) if rank0 else contextlib.nullcontext():
        log.info("run directory %s", run_dir)
        open_run_dir(cfg, trainer, data, run_dir, extra_loggers)
        if rank0:
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        torch.set_float32_matmul_precision("high")
        from torchkiln.engine.state import StopRequested

        try:
            with stop_on_signals(trainer), distributed.collective_errors():
                summary = trainer.fit(loaders["train"], loaders.get("val"), resume=state)
        except StopRequested as stop:
            if rank0:
                _finish(cfg, run_dir, trainer.summary())
            log.warning("stopped by %s; checkpoint written: %s. Resume with: kiln train --resume %s",
                        signal.Signals(stop.signum).name, stop.checkpoint, run_dir)
            raise
        if rank0:
            _finish(cfg, run_dir, summary)
        distributed.barrier()
        best = summary["best"]
        log.info("done: best %s %.4f at epoch %s; run directory %s", summary["monitor"],
                 best if best is not None else float("nan"), summary["best_epoch"], run_dir)
    return run_dir, summary


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
    from torchkiln.engine import distributed
    from torchkiln.loggers import build_loggers

    loggers: list[Any] = list(extra_loggers)
    if distributed.is_rank0():  # rank duties: only rank 0 writes the run's files
        from torchkiln.data.setup import write_skipped

        write_skipped(run_dir, data.skipped)
        if data.normalization is not None:
            (run_dir / NORMALIZATION).write_text(json.dumps(data.normalization.to_dict(), indent=2))
        loggers = build_loggers(cfg, run_dir, trainer.raw_model, data.class_names) + loggers
    trainer.use_run_dir(run_dir, loggers)


def build_parts(cfg: Config, progress: bool = True, pretrained: bool = True,
                normalization: dict[str, Any] | None = None):
    """(Trainer, loaders, data) for a config; nothing is written anywhere. Every mistake the
    config can still hold once its names are checked (data, arguments, the monitor) shows here."""
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
    from torchkiln.engine import distributed
    from torchkiln.engine.settings import make_trainer
    from torchkiln.repro import seed_everything
    from torchkiln.tasks import build_task, dataset_targets

    if cfg.trainer.threads is not None:
        import torch

        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg.seed, deterministic=cfg.trainer.deterministic)
    data = build_data(cfg, normalization=normalization)
    task = build_task(cfg.task)
    task.check_class_names(data.class_names)
    loaders = build_loaders(cfg, data)
    num_classes = num_classes_of(cfg, data)
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
    trainer = make_trainer(
        model, optimizer, loss, task=task, metrics=metrics, scheduler=scheduler, freezer=freezer,
        callbacks=build_callbacks(cfg), **trainer_settings(cfg, monitor, mode), config=resolved,
        progress=progress and cfg.logging.progress and distributed.is_rank0(), **sched_kwargs,
    )
    trainer.resolve_monitor(has_val)
    from torchkiln.probe import probe

    probe(model, loss, task, loaders["train"])
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


def _finish(cfg: Config, run_dir: Path, summary: dict[str, Any]) -> None:
    from torchkiln.loggers.summary import write_summary

    write_summary(run_dir, summary, cfg.name, curves=cfg.logging.plots)


# ------------------------------------------------------------------------------------------
# test
# ------------------------------------------------------------------------------------------
def test(run_dir: Path, checkpoint: str = "best", split: str = "test", overrides: list[str] | None = None
         ) -> dict[str, float]:
    from torchkiln.engine.checkpoint import load_checkpoint, model_weights

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = resolve(apply_overrides(read_file(cfg_path), list(overrides or [])), str(cfg_path))
    ckpt = Path(checkpoint) if checkpoint not in ("best", "last") else run_dir / CHECKPOINTS / f"{checkpoint}.ckpt"
    state = load_checkpoint(ckpt)
    weights = model_weights(state, ckpt)
    stored = stored_normalization(state)
    if cfg.data.normalize is not None and stored is None:
        raise CheckpointError(f"{ckpt}: holds no data.normalize statistics (written before data.normalize"
                              " was set?); test with data.normalize=false or a checkpoint of this run")
    trainer, loaders = build_trainer(cfg, None, progress=False, pretrained=False, normalization=stored)
    if split not in loaders:
        raise ConfigError(
            f"{cfg_path}: this run has no {split} split (set data.{split}_split or data.{split}_dataset),"
            f" or use --split val"
        )
    try:
        trainer.load_weights(weights)
    except CheckpointError as exc:
        raise CheckpointError(f"{ckpt}: {exc}") from exc
    results = trainer.evaluate(loaders[split], split)
    out = {"checkpoint": str(ckpt), "split": split, "samples": len(loaders[split].dataset), **results}
    (run_dir / f"{split}_metrics.json").write_text(json.dumps(out, indent=2))
    _report(trainer, loaders[split], run_dir, split)
    return results


def _report(trainer, loader, run_dir: Path, split: str) -> None:
    """Per-class tables and confusion matrices (classification tasks) beside the metrics."""
    from torchkiln.reports import class_names_of, collect, write_reports

    (run_dir / f"{split}_report.txt").unlink(missing_ok=True)
    outputs, targets = collect(trainer, loader)
    if outputs is not None:
        views = trainer.task.report_views(outputs, targets, class_names_of(loader.dataset))
        write_reports(views, run_dir, split)
