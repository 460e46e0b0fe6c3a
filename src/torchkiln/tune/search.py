"""Ray Tune for `kiln tune`: Ray itself (a local one with this machine's CPUs and GPUs, or a
cluster's), the scheduler (ASHA over epochs), the searcher (Optuna or random), and the Tuner, new
or restored from a search directory. Ray's own files live in `<search>/ray/`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchkiln.config.schema import TuneSettings
from torchkiln.errors import ConfigError, KilnError
from torchkiln.tune.distributions import Distribution

log = logging.getLogger("torchkiln")
RAY_DIR = "ray"  # the search directory's folder of Ray's experiment state
EXTRA = "pip install 'torchkiln[tune]'"


def require_tune(searcher: str) -> None:
    """Ray Tune (and Optuna for its searcher) are the `tune` extra."""
    try:
        import ray.tune  # noqa: F401

        if searcher == "optuna":
            import optuna  # noqa: F401
    except ImportError as exc:
        raise KilnError(f"kiln tune needs Ray Tune and Optuna ({exc.name} is not installed): {EXTRA}") from None


def start_ray(address: str | None) -> None:
    """Join the cluster at `address` (auto, ray://HOST:10001), else start a local Ray; quiet and
    quick: no dashboard, no usage stats, the trials' output stays in their train.log."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials keep the working directory (relative data paths)
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")  # a reused worker waits for its trial's end
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}} if address else None)
    except ConnectionError as exc:
        raise KilnError(f"--address {address}: no Ray cluster there ({exc}); start one with"
                        " `ray start --head`, or leave --address out for a local Ray") from None


def tuner(trial: Callable, settings: TuneSettings, space: dict[str, Distribution], metric: str, mode: str,
          epochs: int, search_dir: Path, seed: int, resume: bool, callbacks: list[Any]):
    """The Tuner of a new search in `search_dir`, or of the one saved there (`resume`)."""
    from ray import tune

    res = settings.resources_per_trial
    trainable = tune.with_resources(trial, {"cpu": res.cpu, "gpu": res.gpu})
    if resume:
        return tune.Tuner.restore(str(search_dir / RAY_DIR), trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    run = tune.RunConfig(
        name=RAY_DIR, storage_path=str(search_dir), verbose=0, callbacks=callbacks,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=0),
    )
    config = tune.TuneConfig(
        metric=metric, mode=mode, num_samples=settings.num_samples, scheduler=_scheduler(settings, epochs),
        search_alg=_searcher(settings, space, seed),
        max_concurrent_trials=settings.max_concurrent if settings.searcher == "optuna" else None,  # random: its own
        reuse_actors=True,  # one process per concurrent trial: torch is imported once
    )
    return tune.Tuner(trainable, param_space={k: d.to_ray() for k, d in space.items()},
                      tune_config=config, run_config=run)


def _scheduler(settings: TuneSettings, epochs: int):
    from torchkiln.callbacks.tune_report import EPOCH

    s = settings.scheduler
    if s is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = s.max_t or epochs
    if s.grace_period > max_t:
        raise ConfigError(f"tune.scheduler.grace_period: {s.grace_period} is beyond max_t {max_t}"
                          " (trainer.epochs); every trial would run to its end")
    return ASHAScheduler(time_attr=EPOCH, max_t=max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def _searcher(settings: TuneSettings, space: dict[str, Distribution], seed: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    grid = [k for k, d in space.items() if d.kind == "grid"]
    if settings.searcher == "random":
        return BasicVariantGenerator(random_state=seed, max_concurrent=settings.max_concurrent or 0)
    if grid:
        raise ConfigError(f"tune.space.{grid[0]}: grid is not a distribution Optuna samples; use"
                          " tune.searcher: random (which runs every grid point), or choice")
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=seed)
