"""What `kiln train` and `kiln test` do: config -> objects -> Trainer, inside a run directory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from torchkiln.config.load import apply_overrides, dump_yaml, read_file, resolve, to_plain
from torchkiln.config.schema import Config
from torchkiln.errors import CheckpointError, ConfigError

log = logging.getLogger("torchkiln")
CHECKPOINTS = "checkpoints"


# ------------------------------------------------------------------------------------------
# run directories
# ------------------------------------------------------------------------------------------
def new_run_dir(cfg: Config) -> Path:
    root = Path(cfg.output_dir) / cfg.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, i = root / stamp, 1
    while run_dir.exists():
        run_dir, i = root / f"{stamp}-{i}", i + 1
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
@contextlib.contextmanager
def file_log(run_dir: Path):
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    level = log.level
    if level == logging.NOTSET or level > logging.INFO:  # the Python API, without the CLI's set-up
        log.setLevel(logging.INFO)
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
        if trainer._stop_signal is not None and signum == signal.SIGINT:
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
          state: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Validate, build, train; returns the run directory and the summary.

    With `resume` (a checkpoint path; `state` its loaded content, if already loaded) the run
    continues in that checkpoint's run directory.
    """
    from torchkiln.config.build import check_components

    check_components(cfg)
    if cfg.logging.wandb is not None:
        from torchkiln.loggers.wandb import require_wandb

        require_wandb()
    import torch

    from torchkiln.engine import distributed
    from torchkiln.engine.step import check_precision
    from torchkiln.engine.trainer import resolve_device

    distributed.init_from_env(cfg.trainer.device, cfg.trainer.dist_timeout)
    rank0 = distributed.is_rank0()
    check_precision(cfg.trainer.precision, resolve_device(distributed.rank_device(cfg.trainer.device)))
    fresh = False
    if resume is not None:
        resume = Path(resume)
        state = state if state is not None else _load_resumable(resume)
        run_dir = run_dir_of(resume)
    elif os.environ.get(distributed.RUN_DIR_ENV):  # made by `kiln train --devices N`
        run_dir = Path(os.environ[distributed.RUN_DIR_ENV])
    else:  # rank duties: one run directory, made by rank 0, its path sent to the others
        run_dir = distributed.broadcast_object(new_run_dir(cfg) if rank0 else None)
        fresh = True
    built = False
    try:
        with file_log(run_dir) if rank0 else contextlib.nullcontext():
            log.info("run directory %s", run_dir)
            trainer, loaders = build_trainer(cfg, run_dir, progress=progress, pretrained=resume is None)
            built = True
            _log_batch_size(cfg)
            if state is not None:
                try:
                    trainer.load_state_dict(state)  # checked before config.yaml is rewritten
                except CheckpointError as exc:
                    raise CheckpointError(f"{resume}: {exc}") from None
                loop = state["loop"]
                if loop.get("stopped_early") or loop.get("epoch", 0) >= cfg.trainer.epochs:
                    log.info("%s: this run already finished (%d epochs); to train longer, resume with"
                             " trainer.epochs=N", resume, loop.get("epoch", 0))
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
    except BaseException:
        if fresh and not built and rank0:  # a data or build error: leave no empty run behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir, summary


def build_trainer(cfg: Config, run_dir: Path | None, progress: bool = True, pretrained: bool = True):
    from torchkiln.config.build import (
        build_data,
        build_freezer,
        build_loaders,
        build_loss,
        build_model,
        build_optimizer,
        build_scheduler,
        num_classes_of,
    )
    from torchkiln.engine.trainer import Trainer
    from torchkiln.loggers import build_loggers
    from torchkiln.repro import seed_everything
    from torchkiln.tasks import build_task, dataset_targets

    seed_everything(cfg.seed, deterministic=cfg.trainer.deterministic)
    data = build_data(cfg)
    if run_dir is not None:
        from torchkiln.data.setup import write_skipped

        write_skipped(run_dir, data.skipped)
    task = build_task(cfg.task)
    task.check_class_names(data.class_names)
    loaders = build_loaders(cfg, data)
    num_classes = num_classes_of(cfg, data)
    model = build_model(cfg, task.num_outputs(num_classes), pretrained=pretrained)
    freezer = build_freezer(cfg, model)
    loss = build_loss(cfg, task, labels=lambda: dataset_targets(data.train), num_classes=num_classes)
    optimizer = build_optimizer(cfg, model)
    scheduler, sched_kwargs = build_scheduler(cfg, optimizer, len(loaders["train"]))
    metrics = task.build_metrics([m if isinstance(m, str) else m.model_dump() for m in cfg.metrics], num_classes)
    from torchkiln.engine import distributed

    # Rank duties: only rank 0 writes logs.
    loggers = build_loggers(cfg, run_dir, model, data.class_names) if run_dir is not None and distributed.is_rank0() else []
    resolved = to_plain(cfg)
    if num_classes is not None and "num_classes" in _parameters(model) and "num_classes" not in cfg.model.args:
        resolved["model"]["args"]["num_classes"] = num_classes  # so the checkpoint rebuilds the model
    t = cfg.trainer
    trainer = Trainer(
        model, optimizer, loss, task=task, scheduler=scheduler, metrics=metrics, epochs=t.epochs,
        device=distributed.rank_device(t.device), precision=t.precision, grad_clip=t.grad_clip, grad_clip_mode=t.grad_clip_mode,
        accumulate=t.accumulate, monitor=t.monitor, mode=t.mode, early_stop=t.early_stop,
        min_delta=t.min_delta, run_dir=run_dir, save_period=t.save_period,
        checkpoint_every_steps=t.checkpoint_every_steps, keep_last=t.keep_last,
        async_checkpoints=t.async_checkpoints, loggers=loggers,
        progress=progress and cfg.logging.progress and distributed.is_rank0(), log_every_n_steps=cfg.logging.every_n_steps,
        on_nonfinite=t.on_nonfinite, compile=t.compile, compile_options=t.compile_options,
        cache_size_limit=t.cache_size_limit, channels_last=t.channels_last, strategy=t.strategy,
        sync_batchnorm=t.sync_batchnorm, config=resolved, freezer=freezer, **sched_kwargs,
    )
    return trainer, loaders


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
    out = {"name": cfg.name, "run_dir": str(run_dir), **summary}
    (run_dir / "summary.json").write_text(json.dumps(out, indent=2))
    if cfg.logging.plots and summary.get("epochs_completed"):
        from torchkiln.engine.checkpoint import load_checkpoint
        from torchkiln.loggers.plots import plot_curves

        last = run_dir / CHECKPOINTS / "last.ckpt"
        history = load_checkpoint(last)["loop"]["history"] if last.is_file() else []
        plot_curves(history, run_dir / "plots" / "curves.png", monitor=summary.get("monitor"))


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
    weights = model_weights(load_checkpoint(ckpt), ckpt)
    trainer, loaders = build_trainer(cfg, None, progress=False, pretrained=False)
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
