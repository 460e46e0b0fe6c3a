"""Two-rank helpers for tests/test_distributed.py and tests/test_fsdp.py: ranks forked from one
forkserver, a rank of `kiln ...` as torchrun starts it, a free rendezvous port."""

from __future__ import annotations

import os

import torch

# What the workers below import, imported once by the forkserver that forks them. Names, not this
# module: on Python 3.11 the server ignores the parent's sys.path (tests/ is not on it), and an
# ImportError only makes the workers import it themselves (slower, as correct).
FORKSERVER_PRELOAD = ["pytest", "yaml", "torch", "torchkiln.commands.train",
                      "torchkiln.commands.kfold", "torchkiln.engine.settings", "torchkiln.config.load"]


def two_ranks(worker, *args, join: bool = True):
    """`worker(rank, 2, *args)` in two processes forked from one forkserver that imported torch and
    torchkiln once (the first call starts it): later pairs start in well under a second instead of
    importing them twice over, as spawn's fresh interpreters do. The server forks before any
    process group, tensor op or thread exists in it, so the workers are as clean as spawned ones.
    join=False: returns the ProcessContext (`while not ctx.join(): ...`)."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)
    return mp.start_processes(worker, args=(2, *args), nprocs=2, join=join, start_method="forkserver")


def torchrun_rank(rank: int, world: int, port: int, *argv: str) -> None:
    """One rank of `kiln ARGV` as torchrun starts it: rank and rendezvous from the environment,
    threads as `kiln train --devices N` gives its workers (OMP_NUM_THREADS = cores / N)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from torchkiln.cli import main

    if main(list(argv)) != 0:
        raise SystemExit(f"rank {rank}: kiln {' '.join(argv)} failed")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
