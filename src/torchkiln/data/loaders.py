"""Loaders whose order is a pure function of (seed, epoch), so a run can resume mid-epoch."""

from __future__ import annotations

import random
import signal
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from torchkiln.data.workers import check_worker_pickling
from torchkiln.errors import CheckpointError, SettingError


class SeededBatch(list):
    """A batch of indices that names where its random draws start: (seed, epoch, rank, batch)."""

    def __init__(self, indices, key: tuple[int, int, int, int]):
        super().__init__(indices)
        self.key = key

    def __reduce__(self):
        return SeededBatch, (list(self), self.key)

    def seed(self) -> int:
        return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in self.key]).generate_state(1)[0])


class SeededFetch(Dataset):
    """Seeds `random`, NumPy and torch in a loader worker before each batch it fetches, from the
    batch's key: random augmentation then depends on (seed, epoch, rank, batch) alone, not on which
    worker fetches the batch, on how many workers there are, or on the batches a mid-epoch resume
    skips. (Without workers the main process fetches, and its RNG stream, saved in every
    checkpoint, already resumes exactly: nothing is reseeded there.)"""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, indices):
        if isinstance(indices, SeededBatch) and torch.utils.data.get_worker_info() is not None:
            seed = indices.seed()
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        inner = getattr(self.dataset, "__getitems__", None)
        return inner(list(indices)) if inner else [self.dataset[i] for i in indices]


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

    def _epoch_order(self) -> list[int]:
        """The whole epoch's order, before padding and sharding."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.n, generator=g).tolist()
        return list(range(self.n))

    def _order(self) -> list[int]:
        order = self._epoch_order()
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
        batches = self._all_batches()
        for k in range(self.start, len(batches)):
            yield SeededBatch(batches[k], (self.seed, self.epoch, self.rank, k))

    def batch_sizes(self) -> list[int]:
        """This rank's batch sizes over a whole epoch, padding included (equal on every rank)."""
        total = self.n + self._padding()
        per_rank = (total - self.rank + self.world_size - 1) // self.world_size
        full, rest = divmod(per_rank, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest and not self.drop_last else [])

    def __len__(self) -> int:
        return len(self.batch_sizes())


def seed_worker(worker_id: int) -> None:
    """Seed NumPy and `random` in each worker from torch's per-worker seed (then SeededFetch
    reseeds everything before each batch of torchkiln's samplers).

    Workers ignore SIGINT: a Ctrl-C in a terminal reaches the whole process group, and the main
    process alone decides how to stop (finish the step, checkpoint) and shuts the workers down.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    balanced_labels=None,
    fast: bool = False,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    batch_sampler: ResumableBatchSampler | None = None,
) -> DataLoader | FastLoader:
    """A loader whose order is a function of (seed, epoch); `fast` slices in-memory tensors instead.

    `balanced_labels` (the training samples' class labels) turns on class-balanced sampling.
    `rank`/`world_size` shard the data for DDP: training padded to equal shards, evaluation not.
    A given `batch_sampler` (e.g. data/query_sampler.py's) replaces the one these settings make.
    """
    sampler = batch_sampler
    if sampler is None:
        sampler = make_batch_sampler(len(dataset), batch_size, train=train, seed=seed, shuffle=shuffle,
                                     drop_last=drop_last, balanced_labels=balanced_labels, rank=rank,
                                     world_size=world_size)
    if fast:
        return FastLoader(dataset, sampler, device)
    extra = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return DataLoader(
        SeededFetch(dataset) if num_workers > 0 else dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_fn,
        **extra,
    )


class BalancedBatchSampler(ResumableBatchSampler):
    """Batches drawn with replacement, each sample weighted 1 / (its class count).

    The draw for an epoch comes from a generator seeded with `seed + epoch`, so like the plain
    sampler it is a pure function of (seed, epoch) and `skip(k)` resumes mid-epoch. An epoch has
    as many samples as the dataset (`num_samples` to change that).
    """

    def __init__(self, labels, batch_size: int, seed: int, drop_last: bool = False,
                 num_samples: int | None = None, rank: int = 0, world_size: int = 1):
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        counts = torch.bincount(labels)
        self.weights = (1.0 / counts.clamp(min=1).double())[labels]
        n = num_samples if num_samples is not None else len(labels)
        super().__init__(n, batch_size, shuffle=True, seed=seed, drop_last=drop_last, rank=rank,
                         world_size=world_size)

    def _epoch_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()


def fast_source(dataset: Dataset) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
    """(tensors, index map) when `dataset` is in-memory tensors, possibly under Subsets; else None."""
    from torchkiln.data.wrappers import unwrap

    ds, index = unwrap(dataset, wrappers=False)  # a wrapper changes the samples: no fast path
    get = getattr(ds, "fast_tensors", None)
    if get is None:
        return None
    return tuple(get()), None if index is None else torch.as_tensor(index, dtype=torch.int64)


class FastLoader:
    """Batches by index slicing of tensors already on the device: no __getitem__, no collate.

    Yields exactly what a DataLoader over the same dataset and sampler yields (a list of
    stacked tensors), in the same order; `batch_sampler` drives the order (set_epoch, skip).
    """

    def __init__(self, dataset: Dataset, batch_sampler: ResumableBatchSampler,
                 device: torch.device | str = "cpu"):
        source = fast_source(dataset)
        if source is None:
            raise ValueError("FastLoader needs a dataset with fast_tensors() (possibly under Subsets)")
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.device = torch.device(device)
        tensors, index = source
        self.tensors = tuple(t.to(self.device) for t in tensors)
        self.index = index.to(self.device) if index is not None else None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        batches = list(self.batch_sampler)
        if not batches:
            return
        flat = torch.as_tensor([i for b in batches for i in b], dtype=torch.int64).to(self.device)
        if self.index is not None:
            flat = self.index[flat]
        start = 0
        for b in batches:
            idx = flat[start : start + len(b)]
            start += len(b)
            yield [t.index_select(0, idx) for t in self.tensors]


def make_batch_sampler(n: int, batch_size: int, *, train: bool, seed: int, shuffle: bool = True,
                       drop_last: bool = False, balanced_labels=None, rank: int = 0,
                       world_size: int = 1) -> ResumableBatchSampler:
    if balanced_labels is not None and train:
        return BalancedBatchSampler(balanced_labels, batch_size, seed=seed, drop_last=drop_last,
                                    rank=rank, world_size=world_size)
    return ResumableBatchSampler(n, batch_size, shuffle=shuffle and train, seed=seed,
                                 drop_last=drop_last and train, rank=rank, world_size=world_size,
                                 pad=train)


def set_loader_epoch(loader: Iterable, epoch: int, skip: int = 0) -> None:
    """Fix the loader's order (and its workers' seeds) for this epoch; drop its first `skip` batches."""
    check_worker_pickling(loader)  # before any worker starts: a notebook's Dataset cannot reach them
    if not isinstance(loader, DataLoader) and getattr(loader, "batch_sampler", None) is None:
        return
    sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    for s in (sampler, getattr(sampler, "sampler", None)):
        if s is not None and hasattr(s, "set_epoch"):
            s.set_epoch(epoch)
    if skip:
        if not hasattr(sampler, "skip"):
            raise CheckpointError(
                "cannot resume mid-epoch: the training loader's sampler cannot skip batches;"
                " build it with torchkiln.data.loaders.make_loader"
            )
        sampler.skip(skip)
    gen = getattr(loader, "generator", None)
    seed = getattr(sampler, "seed", None)
    if gen is not None and seed is not None:
        gen.manual_seed(seed + 1_000_003 * (epoch + 1))


def check_sized(loader: Any, setting: str = "train_loader") -> None:
    """Training counts an epoch's batches before it starts (accumulation groups, per-step schedules,
    resuming mid-epoch): refuse a loader without a length."""
    try:
        len(loader)
        return
    except TypeError:
        pass
    dataset = getattr(loader, "dataset", None)
    if loader is None:
        found = "found None"
    elif isinstance(dataset, IterableDataset):
        found = f"a DataLoader over an IterableDataset ({type(dataset).__name__}) has none"
    else:
        found = f"a {type(loader).__name__} has none"
    raise SettingError(setting, f"fit needs a loader with a length; {found}: give a map-style Dataset"
                       " (__len__ and __getitem__) in a DataLoader, or a DataLoader with a sized sampler")


def epoch_batch_sizes(loader: Iterable, n_batches: int) -> list[int] | None:
    """The sizes of the epoch's batches when the loader's batch sampler tells them ahead, so that
    accumulation weighs micro-batches by samples (a short last batch counts for what it holds)."""
    bs = getattr(loader, "batch_sampler", None)
    if callable(getattr(bs, "batch_sizes", None)):  # torchkiln's samplers know their own
        sizes = list(bs.batch_sizes())
        return sizes if len(sizes) == n_batches else None
    size = getattr(bs, "batch_size", None)
    if not isinstance(size, int) or size < 1 or not hasattr(getattr(bs, "sampler", None), "__len__"):
        return None
    full, rest = divmod(len(bs.sampler), size)
    sizes = [size] * full + ([rest] if rest and not getattr(bs, "drop_last", False) else [])
    return sizes if len(sizes) == n_batches else None
