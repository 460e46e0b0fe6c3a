"""Ray Tune for `kiln tune`: Ray itself (a local one with this machine's CPUs and GPUs, or a
cluster's), the scheduler (ASHA over epochs), the searcher (Optuna or random), and the Tuner, new
or restored from a search directory. Ray's own files live in `<search>/ray/`."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchkiln.config.schema import TuneSettings
from torchkiln.errors import ConfigError, KilnError, first_line
from torchkiln.tune.distributions import Distribution

log = logging.getLogger("torchkiln")
RAY_DIR = "ray"  # the search directory's folder of Ray's experiment state
EXTRA = "pip install 'torchkiln[tune]'"
PROBE_S = 5.0  # how long --address may take to answer


def require_tune(searcher: str, address: str | None) -> None:
    """Ray Tune (and Optuna for its searcher) are the `tune` extra. Ray's settings are set first:
    it reads them once, when it is imported."""
    _settings(address)
    try:
        import ray.tune  # noqa: F401

        if searcher == "optuna":
            import optuna  # noqa: F401
    except ImportError as exc:
        raise KilnError(f"kiln tune needs Ray Tune and Optuna ({exc.name} is not installed): {EXTRA}") from None


def _settings(address: str | None) -> None:
    """Ray's own settings for kiln tune (a user's environment wins)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials keep the working directory (relative data paths)
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")  # a reused worker waits for its trial's end
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the reporter of RunConfig(verbose=0): silent, no box
    if address is None:  # a local Ray (a cluster's settings are its own)
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's default, which it announces when unset
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")  # idle workers the trials would not use


def start_ray(address: str | None) -> None:
    """Join the cluster at `address` (auto, HOST:PORT, ray://HOST:10001), else start a local Ray;
    quiet and quick: no dashboard, no usage stats, no experiment box or token-auth notice (Ray's own
    settings), the trials' output stays in their train.log."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}} if address else None)
    except (ConnectionError, RuntimeError) as exc:
        reason = first_line(exc) or type(exc).__name__
        if address is None:
            raise KilnError(f"kiln tune: a local Ray did not start ({reason}); its logs are in"
                            " /tmp/ray/session_latest/logs") from None
        raise _no_cluster(address, reason) from None


def probe(address: str | None) -> None:
    """HOST:PORT (or ray://HOST:PORT) must accept a connection: a cluster that is not there is one
    line at once, not Ray's minute of retries. `auto` is found by Ray itself."""
    if address in (None, "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise KilnError(f"--address {address}: not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_S).close()
    except OSError as exc:
        raise _no_cluster(address, exc.strerror or type(exc).__name__) from None


def _no_cluster(address: str | None, reason: str) -> KilnError:
    return KilnError(f"--address {address}: no Ray cluster there ({reason}); start one with"
                     " `ray start --head`, or leave --address out for a local Ray")


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
        search_alg=_searcher(settings, seed),
        max_concurrent_trials=settings.max_concurrent if settings.searcher == "optuna" else None,  # random: its own
        reuse_actors=True,  # one process per concurrent trial: torch is imported once
    )
    return tune.Tuner(trainable, param_space={k: d.to_ray() for k, d in space.items()},
                      tune_config=config, run_config=run)


def check(settings: TuneSettings, space: dict[str, Distribution], epochs: int) -> None:
    """The scheduler and the searcher fit the space and the run, before Ray starts."""
    s = settings.scheduler
    if s is not None and s.grace_period > (s.max_t or epochs):
        raise ConfigError(f"tune.scheduler.grace_period: {s.grace_period} is beyond max_t {s.max_t or epochs}"
                          " (trainer.epochs); every trial would run to its end")
    grid = [k for k, d in space.items() if d.kind == "grid"]
    if settings.searcher == "optuna" and grid:
        raise ConfigError(f"tune.space.{grid[0]}: grid is not a distribution Optuna samples; use"
                          " tune.searcher: random (which runs every grid point), or choice")


def _scheduler(settings: TuneSettings, epochs: int):
    from torchkiln.callbacks.tune_report import EPOCH

    s = settings.scheduler
    if s is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=EPOCH, max_t=s.max_t or epochs, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def _searcher(settings: TuneSettings, seed: int):
    if settings.searcher == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=settings.max_concurrent or 0)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=seed)
