"""Process group, rank duties, model wrapping, metric/loss sync, and the `--devices N` launcher.

One process per device (DDP) is the main path: `kiln train --devices N` starts N workers through
torch.distributed's elastic launcher (what `torchrun` runs), and `torchrun ... -m torchkiln train`
starts them from outside; either way each worker reads RANK / WORLD_SIZE / LOCAL_RANK from its
environment. Every helper here is a no-op in a single process, so the Trainer calls them always.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from datetime import timedelta
from typing import Any

import torch
from torch import distributed as dist
from torch import nn

from torchkiln import gcpause
from torchkiln.engine.device import to_cpu
from torchkiln.errors import (
    WORKER_ERRORS_ENV,
    CheckpointError,
    SettingError,
    TrainingError,
    worker_errors,
)

log = logging.getLogger("torchkiln")
RUN_DIR_ENV = "KILN_RUN_DIR"  # set by `kiln train --devices N` so a restarted worker finds its run


# ------------------------------------------------------------------------------------------
# ranks
# ------------------------------------------------------------------------------------------
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def restart_count() -> int:
    """How often the elastic agent has restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


# ------------------------------------------------------------------------------------------
# process group
# ------------------------------------------------------------------------------------------
def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun (or `kiln train --devices N`) describes in the environment.

    Backend NCCL when this rank trains on CUDA, Gloo otherwise. Returns True when distributed.
    A collective that waits longer than `timeout_s` (a peer died or hangs) raises instead of hanging.
    """
    if env_world_size() <= 1:
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    on_cuda = str(device) != "cpu" and not str(device).startswith("mps") and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    backend = "nccl" if on_cuda else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        # The elastic agent's store outlives a restart; without a per-attempt prefix a restarted
        # rank can read the dead attempt's Gloo/NCCL addresses and fail to connect.
        agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timeout)
        store = dist.PrefixStore(f"torchkiln/attempt_{restart_count()}", agent)
        dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=env_world_size(), timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    quiet_other_ranks()
    log.info("process group: %s, %d processes (this is rank %d)", backend, world_size(), rank())
    return True


def rank_device(device: str) -> str:
    """Under DDP each rank owns the GPU of its local rank; `cuda` or `auto` mean that one."""
    if not is_distributed() or dist.get_backend() != "nccl":
        return device
    if device not in ("auto", "cuda") and not device.startswith("cuda"):
        return device
    if device.startswith("cuda:") and world_size() > 1:
        log.warning("trainer.device %s ignored under DDP: rank %d uses cuda:%d", device, rank(),
                    torch.cuda.current_device())
    return f"cuda:{torch.cuda.current_device()}"


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_kiln_ranked", False):
            record.msg = f"[rank {os.environ.get('RANK', rank())}] {record.msg}"
            record._kiln_ranked = True  # type: ignore[attr-defined]
        return True


def quiet_other_ranks() -> None:
    """Ranks other than 0 log warnings and errors only, prefixed with their rank."""
    if int(os.environ.get("RANK", rank())) == 0:
        return
    log.setLevel(logging.WARNING)
    if not any(isinstance(f, _RankFilter) for f in log.filters):
        log.addFilter(_RankFilter())


_COMM_FAILURE = re.compile(r"gloo|nccl|connection|timed out|timeout|peer|socket|broken pipe", re.IGNORECASE)


@contextlib.contextmanager
def collective_errors():
    """A collective that fails because a peer died or timed out becomes one line naming this rank."""
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        text = str(exc).strip()
        if not is_distributed() or not _COMM_FAILURE.search(text):
            raise
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise TrainingError(
            f"rank {rank()} of {world_size()}: lost contact with another process, which probably died"
            f" or hung (its own error names it) ({first}); resume from the last checkpoint with --resume"
        ) from exc


# ------------------------------------------------------------------------------------------
# objects and reductions (no-ops in one process)
# ------------------------------------------------------------------------------------------
def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def sum_over_ranks(total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """(sum, count) added over ranks: a loss averaged over every sample of every rank."""
    if not is_distributed():
        return total, count
    packed = torch.stack([total.detach().double().reshape(()), torch.tensor(float(count), device=total.device,
                                                                            dtype=torch.float64)])
    dist.all_reduce(packed)
    return packed[0].to(total.dtype), int(round(packed[1].item()))


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on every rank (one all-reduce)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_rank(signum: int | None, device: torch.device) -> int | None:
    """A stop request (signal number) seen by any rank, so every rank stops at the same step."""
    if not is_distributed():
        return signum
    flag = torch.tensor([signum or 0], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def sum_values(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over ranks (one all-reduce)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def _flat_by_dtype(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Gradients averaged over ranks, one flat all-reduce per dtype (what DDP does, after backward
    instead of during it); a parameter without a gradient on this rank counts as zeros."""
    if not is_distributed():
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = world_size()
    for grads in _flat_by_dtype([p.grad for p in params]).values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_buffers(model: nn.Module) -> None:
    """The module's floating buffers (BatchNorm statistics) from rank 0, as DDP keeps them."""
    if not is_distributed():
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    for group in _flat_by_dtype(buffers).values():
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, 0)
        offset = 0
        for b in group:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------
def check_fingerprints(fp: str) -> None:
    """Every rank must build the same initial parameters (same seed, same config)."""
    prints = gather_objects(fp)
    if len(set(prints)) > 1:
        groups: dict[str, list[int]] = {}
        for r, p in enumerate(prints):
            groups.setdefault(p, []).append(r)
        parts = "; ".join(f"ranks {', '.join(map(str, rs))}: {p}" for p, rs in groups.items())
        raise TrainingError(
            f"the ranks built different initial parameters ({parts}); every rank must use the same"
            f" seed and config (do not seed with the rank before building the model)"
        )


def wrap_model(model: nn.Module, device: torch.device, strategy: str = "auto",
               sync_batchnorm: bool = False, optimizer: torch.optim.Optimizer | None = None,
               fsdp: Any = None) -> nn.Module:
    """DDP (one process per device), FSDP2 (each rank holds a shard; `fsdp` its FSDPSettings, and
    `optimizer` is re-pointed at the sharded parameters), DataParallel (one process, several
    GPUs), or the model as is."""
    if strategy not in ("auto", "ddp", "dp", "fsdp"):
        raise SettingError("strategy", f"expected auto, ddp, fsdp or dp; found {strategy!r}")
    if strategy == "dp":
        if is_distributed():
            raise SettingError("strategy", "dp runs in one process; under torchrun or --devices use ddp")
        n = torch.cuda.device_count() if device.type == "cuda" else 0
        if n < 2:
            log.warning("trainer.strategy dp: fewer than 2 GPUs visible; training on %s without DataParallel",
                        device)
            return model
        log.info("DataParallel over %d GPUs; DDP (kiln train --devices %d) is faster", n, n)
        return nn.DataParallel(model)
    if not is_distributed():
        if strategy in ("ddp", "fsdp"):
            log.info("trainer.strategy %s in a single process: nothing to distribute"
                     " (start several with kiln train --devices N or torchrun)", strategy)
        return model
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from torchkiln.seeding import fingerprint

    check_fingerprints(fingerprint(model))
    if strategy == "fsdp":
        from torchkiln.engine.fsdp import FSDPSettings, shard_model

        return shard_model(model, optimizer, fsdp if fsdp is not None else FSDPSettings())
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The model without DDP, for evaluation: ranks see uneven shards, so no collective may run."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------
# per-rank checkpoint state: RNG and the epoch's partial accumulators
# ------------------------------------------------------------------------------------------
def gather_rank_states(own: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's own state (RNG, partial epoch sums), gathered for rank 0 to write; None in one process."""
    if not is_distributed():
        return None
    return gather_objects(to_cpu(own, float32=False))


def own_rank_state(state: dict[str, Any], mid_epoch: bool) -> dict[str, Any] | None:
    """This rank's entry of a checkpoint's per-rank states, or None to use the checkpoint's own (rank 0's)."""
    ranks = state.get("ranks")
    saved = len(ranks) if ranks else 1
    if saved != world_size():
        if mid_epoch:
            raise CheckpointError(
                f"this mid-epoch checkpoint was written by {saved} process(es) and is resumed with"
                f" {world_size()}; the epoch's data shards differ, so resume with {saved} process(es)"
                f" or from an end-of-epoch checkpoint"
            )
        if is_rank0():
            log.warning("resuming a %d-process checkpoint with %d process(es): RNG streams restart per rank",
                        saved, world_size())
        return None
    return ranks[rank()] if ranks else None


# ------------------------------------------------------------------------------------------
# `kiln train --devices N`: the elastic launcher, as torchrun uses it
# ------------------------------------------------------------------------------------------
def launch(worker_args: list[str], nprocs: int, max_restarts: int = 0, run_dir: str | None = None) -> int:
    """Start `nprocs` workers running `python -m torchkiln WORKER_ARGS` on this machine; wait for them.

    A worker that dies makes the agent stop the others; the error names the first rank that failed.
    With `max_restarts`, the group restarts and resumes from the run's last checkpoint.
    """
    import shutil
    import tempfile
    import uuid

    from torch.distributed.launcher.api import LaunchConfig

    gcpause.resume()  # this process now waits on its workers, for as long as they train
    if run_dir is not None:
        os.environ[RUN_DIR_ENV] = run_dir
    # As torchrun does: N processes each running all cores' threads would oversubscribe the CPU.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs)))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
        monitor_interval=0.1, start_method="spawn",
        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",  # forwarded to the workers (SLURM's warning)
        shutdown_timeout=120,  # workers stopped by a signal first write their checkpoint
    )
    # Its own line on a failed worker would come after the worker's; the failure is reported below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    errors = os.environ[WORKER_ERRORS_ENV] = tempfile.mkdtemp(prefix="kiln-errors-")
    code = 1
    try:
        code = _launch(config, worker_args, nprocs, max_restarts, run_dir)
        return code
    finally:
        if code != 0:  # a user's error every rank hit: one line, not one per rank
            for line in worker_errors(errors, nprocs):
                print(line, file=sys.stderr)
        shutil.rmtree(errors, ignore_errors=True)
        os.environ.pop(WORKER_ERRORS_ENV, None)


def first_death(failures: dict[int, Any]) -> tuple[int, Any] | None:
    """The (rank, failure) to report of a failed worker group, or None when the failure is a
    user's error (exit code 2), which the workers wrote themselves.

    Once one worker fails, the agent stops the others: SIGTERM (a worker in `fit` catches it and
    exits with 128 + SIGTERM), then SIGKILL for one that does not stop within 30 s; it records
    those after the real failures. So a SIGTERM's exit, or a SIGKILL dated 2 s or more after the
    first failure (the real ones are seen in one poll: the same whole second, or the next), is a
    consequence; of the rest, the earliest is the cause, and within the first poll (the agent's
    timestamps are whole seconds) a worker that died (a signal, a crash) comes before a peer's own
    error (a collective that lost its peer: exit code 2). A group whose only failures are SIGTERMs
    reports the first of them."""
    import signal

    first = min(f.timestamp for f in failures.values())

    def consequence(f: Any) -> bool:
        return (f.exitcode in (-int(signal.SIGTERM), 128 + int(signal.SIGTERM))
                or f.exitcode == -int(signal.SIGKILL) and f.timestamp >= first + 2)

    causes = {r: f for r, f in failures.items() if not consequence(f)} or failures
    # Seen in the first poll (the first whole second or the next): one group, deaths first.
    rank = min(causes, key=lambda r: (max(causes[r].timestamp, first + 1), causes[r].exitcode == 2, r))
    return None if causes[rank].exitcode == 2 else (rank, causes[rank])


def _launch(config: Any, worker_args: list[str], nprocs: int, max_restarts: int, run_dir: str | None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(config, sys.executable)("-m", "torchkiln", *worker_args)
    except SignalException as exc:  # forwarded to the workers, which checkpoint and stop
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        cause = first_death(exc.failures)
        if cause is None:  # a user's error: the workers wrote it in one line, with its fix
            return 2
        failed, failure = cause
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        resume = f"; resume with: kiln train --resume {run_dir} --devices {nprocs}" if run_dir else ""
        raise TrainingError(
            f"worker rank {failed} (pid {failure.pid}) {how}; the other workers were stopped"
            f"{' after ' + str(max_restarts) + ' restart(s)' if max_restarts else ''}{resume}"
        ) from None
    return 0
