"""`kiln tune`: a hyperparameter search with Ray Tune over any config key.

Everything is checked here before Ray starts: the config, every searched key and the values its
distribution can take, the search's number (`tune.metric`, default the run's monitor) and the
extra. Each trial is an ordinary torchkiln run (`commands/train.py:train`) in
`<search>/trials/<trial id>/`, reporting every epoch through the `TuneReport` callback.

```
runs/<name>/tune-<timestamp>/
  search.yaml   the resolved config of the search (what --resume continues)
  trials/<id>/  each trial's run directory (config.yaml, metrics.csv, checkpoints/, ...)
  ray/          Ray's experiment state and the trials' checkpoints given to Ray
  trials.csv  best.yaml  plots/
```
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from torchkiln.commands.logs import console
from torchkiln.config.load import (
    config_errors_from,
    default_config_path,
    dump_yaml,
    load_checked,
    resolve,
)
from torchkiln.config.schema import Config, to_plain
from torchkiln.errors import ConfigError, KilnError, first_line
from torchkiln.rundir import CHECKPOINTS, LAST, runs_root

log = logging.getLogger("torchkiln")
SEARCH_CONFIG = "search.yaml"
_RUN_DONE = threading.Event()  # this worker's trial has finished its run (set when no trial runs)
_RUN_DONE.set()
TRIALS = "trials"


def main(args: argparse.Namespace) -> int:
    console(args.quiet)
    cfg, source, search_dir = _search_of(args)
    settings = cfg.tune
    from torchkiln.tune import results, search
    from torchkiln.tune.space import check_space

    space = check_space(cfg, source)
    metric, mode = _objective(cfg, source)
    search.check(settings, space, cfg.trainer.epochs)
    search.probe(args.address)  # a cluster that is not there ends here, before Ray or any file
    search.require_tune(settings.searcher, args.address)
    started = time.perf_counter()
    search.start_ray(args.address)
    if not args.resume:
        search_dir.mkdir(parents=True)
        (search_dir / SEARCH_CONFIG).write_text(dump_yaml(cfg))
    log.info("search directory %s: %d sample(s) of %s, %s %s", search_dir, settings.num_samples,
             ", ".join(space), mode, metric)
    trial = _trainable(cfg, search_dir, source, metric)
    tuner = search.tuner(trial, settings, space, metric, mode, cfg.trainer.epochs, search_dir, cfg.seed,
                         resume=bool(args.resume), callbacks=[results.progress_callback(metric)])
    tuner.fit()
    table = results.collect(search_dir / search.RAY_DIR, search_dir / TRIALS, list(space), metric, mode,
                            cfg.trainer.epochs)
    print(results.write(table, search_dir, metric, strip=_strip_search))
    log.info("search done in %.1f s: %s", time.perf_counter() - started, search_dir)
    if table.unfinished:
        log.warning("the search was interrupted; continue it with: kiln tune --resume %s", search_dir)
        return 130
    return 0


def _search_of(args: argparse.Namespace) -> tuple[Config, str, Path]:
    """(config, its file, the search directory): --resume reads the search's own search.yaml."""
    if args.resume:
        search_dir = Path(args.resume).resolve()
        path = search_dir / SEARCH_CONFIG
        if not path.is_file():
            raise ConfigError(f"--resume {args.resume}: not a search directory (no {SEARCH_CONFIG});"
                              " give the tune-<timestamp> folder `kiln tune` made")
        cfg = load_checked(path, args.overrides)
        return cfg, str(path), search_dir
    source = str(args.config or default_config_path())
    cfg = load_checked(args.config, args.overrides)
    if cfg.tune is None:
        raise ConfigError(f"{source}: tune: no such section; add tune.space (the keys to search), e.g."
                          " tune: {space: {optimizer.args.lr: {loguniform: [1.0e-4, 1.0e-1]}}}")
    return cfg, source, _new_search_dir(cfg)


def _new_search_dir(cfg: Config) -> Path:
    base = (runs_root(cfg) / f"tune-{time.strftime('%Y%m%d-%H%M%S')}").resolve()  # Ray wants it absolute
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def _objective(cfg: Config, source: str) -> tuple[str, str]:
    """The number the search ranks trials by, and its mode: tune.metric, else the run's monitor.
    The base config is built once (as `kiln config check` does), so a number it will not log fails
    here, not in every trial."""
    from torchkiln.commands.train import build_parts

    with config_errors_from(source):
        trainer, loaders, _ = build_parts(cfg, progress=False)
        metric = cfg.tune.metric or trainer.monitor.name
        logged = trainer.logged_names(loaders.get("val") is not None)
        from torchkiln.callbacks.tune_report import TuneReport

        TuneReport(metric).check(trainer, logged)
    if cfg.tune.mode is not None:
        return metric, cfg.tune.mode
    return metric, trainer.monitor.mode if metric == trainer.monitor.name else trainer.task.monitor_mode(metric)


def _trainable(cfg: Config, search_dir: Path, source: str, metric: str):
    from ray import tune

    base = to_plain(cfg)
    base["tune"] = None  # a trial is a plain run
    base["callbacks"] = [*base["callbacks"], {"type": "TuneReport", "args": {"metric": metric}}]
    if base["trainer"]["threads"] is None:  # as many threads as the trial's CPUs, in config.yaml too
        base["trainer"]["threads"] = max(1, int(cfg.tune.resources_per_trial.cpu))
    from ray.tune.trainable import wrap_function

    trainable = wrap_function(tune.with_parameters(run_trial, base=base, search_dir=str(search_dir), source=source))

    class Trial(trainable):
        """Ray ends the worker of a trial its scheduler stopped right after releasing the trial's
        report; the run then still writes its last files (summary.json, curves). Wait for them."""

        def cleanup(self):
            try:
                super().cleanup()
            finally:
                # imported by reference: Ray pickles this class
                from torchkiln.commands.tune import wait_for_run

                wait_for_run()

    Trial.__name__ = Trial.__qualname__ = "trial"
    return Trial


def _strip_search(data: dict[str, Any]) -> dict[str, Any]:
    """A trial's config.yaml as a plain run's config (best.yaml): without the report to Ray."""
    data["callbacks"] = [c for c in data.get("callbacks") or [] if c.get("type") != "TuneReport"]
    return data


# ------------------------------------------------------------------------------------------
# one trial (in a Ray worker)
# ------------------------------------------------------------------------------------------
def wait_for_run(limit_s: float = 120.0) -> None:
    """Until this worker's trial has finished its run (at once when none runs)."""
    _RUN_DONE.wait(limit_s)


def run_trial(values: dict[str, Any], base: dict[str, Any], search_dir: str, source: str) -> None:
    """A trial: the base config with its sampled `values`, trained as `kiln train` would, in its
    own run directory; restored from the checkpoint it gave Ray, when Ray restarts it."""
    _RUN_DONE.clear()
    try:
        _run_trial(values, base, search_dir, source)
    finally:
        _RUN_DONE.set()


def _run_trial(values: dict[str, Any], base: dict[str, Any], search_dir: str, source: str) -> None:
    from ray import tune

    from torchkiln.callbacks.tune_report import stopped_by_search
    from torchkiln.commands.train import train
    from torchkiln.config.load import add_import_roots
    from torchkiln.engine.state import StopRequested
    from torchkiln.tune.space import with_values

    add_import_roots(Path(source))  # the user's own modules resolve in the worker too
    run_dir = Path(search_dir) / TRIALS / tune.get_context().get_trial_id()
    try:
        cfg = resolve(with_values(base, values), source)
        resume = _restored(tune.get_checkpoint(), run_dir)
        with _planned_run_dir(run_dir):
            train(cfg, resume=resume, progress=False, source=source)
    except StopRequested:
        return
    except SystemExit:  # Ray ended a report outside the epoch's end (the run is stopped anyway)
        raise
    except Exception as exc:
        run_dir.mkdir(parents=True, exist_ok=True)
        reason = first_line(exc) or type(exc).__name__
        from torchkiln.tune.results import ERROR_FILE

        (run_dir / ERROR_FILE).write_text(reason if isinstance(exc, KilnError) else f"{type(exc).__name__}: {reason}")
        raise
    if stopped_by_search():
        sys.exit(0)  # as Ray's own report ends a stopped trial; the run above finished cleanly


def _restored(checkpoint: Any, run_dir: Path) -> Path | None:
    """The trial's checkpoint that Ray kept, put back as its run's last.ckpt (the run resumes from it)."""
    if checkpoint is None:
        return None
    target = run_dir / CHECKPOINTS / LAST
    target.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:
        shutil.copyfile(Path(folder) / LAST, target)
    log.info("trial restored from its checkpoint %s", target)
    return target


@contextlib.contextmanager
def _planned_run_dir(run_dir: Path):
    """The trial's run directory, named by its trial id, as `kiln train --devices N` plans one."""
    from torchkiln.engine import distributed

    before = os.environ.get(distributed.RUN_DIR_ENV)
    os.environ[distributed.RUN_DIR_ENV] = str(run_dir)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(distributed.RUN_DIR_ENV, None)
        else:
            os.environ[distributed.RUN_DIR_ENV] = before
