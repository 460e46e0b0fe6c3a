"""Loaders whose order is a pure function of (seed, epoch), so a run can resume mid-epoch."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices; shuffled by a generator seeded with `seed + epoch`.

    `set_epoch(e)` picks the epoch's order and `skip(k)` drops its first k batches, which is how a
    mid-epoch resume sees exactly the remaining batches of the same order.

    Under DDP rank r takes positions r, r + W, r + 2W, ... of the epoch's order, so global batch k
    (the union of every rank's batch k) holds the same samples as batch k of one process with a
    W times larger batch. `pad` (training) repeats the order's first samples until it divides by
    W so that every rank has the same number of batches (as DistributedSampler does); evaluation
    shards without padding, so each sample is counted exactly once.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, pad: bool = True):
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def skip(self, batches: int) -> None:
        self.start = batches

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        extra = self._padding()
        if extra:
            order = order + (order * (extra // max(1, self.n) + 1))[:extra]
        return order[self.rank :: self.world_size]

    def _padding(self) -> int:
        return (-self.n) % self.world_size if self.pad and self.world_size > 1 else 0

    def _all_batches(self) -> list[list[int]]:
        order = self._order()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._all_batches()[self.start :]

    def __len__(self) -> int:
        total = self.n + self._padding()
        per_rank = (total - self.rank + self.world_size - 1) // self.world_size
        full, rest = divmod(per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


def seed_worker(worker_id: int) -> None:
    """Seed NumPy and `random` in each worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    collate_fn=None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """`rank`/`world_size` shard the data for DDP: training padded to equal shards, evaluation not."""
    sampler = ResumableBatchSampler(
        len(dataset), batch_size, shuffle=shuffle and train, seed=seed, drop_last=drop_last and train,
        rank=rank, world_size=world_size, pad=train,
    )
    extra = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_fn,
        **extra,
    )
