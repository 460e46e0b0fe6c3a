"""Batches of whole queries, for ranking: a listwise loss sees each query's list complete."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from torchkiln.data.groups import query_members
from torchkiln.data.loaders import ResumableBatchSampler, SeededBatch


def queries_per_batch(groups: np.ndarray, batch_size: int) -> int:
    """How many whole queries make about `batch_size` items: batch_size / mean items per query."""
    n_queries = len(np.unique(groups))
    if not n_queries:
        return 1
    return max(1, round(batch_size * n_queries / len(groups)))


class QueryBatchSampler(ResumableBatchSampler):
    """Each batch holds whole queries: `queries_per_batch` of them, shuffled by query.

    The order of queries is a function of (seed, epoch) alone and `skip(k)` resumes mid-epoch, as
    for the plain sampler, whose ordering, padding and DDP sharding this reuses with queries in the
    place of samples: under DDP rank r takes queries r, r + W, ... of the epoch's order (training
    pads with repeated queries so that every rank has as many batches). A batch lists its queries'
    items in the data set's order. `batch_size` (the base class's) counts queries.
    """

    def __init__(self, groups: np.ndarray, queries_per_batch: int, shuffle: bool, seed: int,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, pad: bool = True):
        self.members = query_members(groups)
        super().__init__(len(self.members), queries_per_batch, shuffle=shuffle, seed=seed,
                         drop_last=drop_last, rank=rank, world_size=world_size, pad=pad)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        for k in range(self.start, len(batches)):
            items = np.concatenate([self.members[q] for q in batches[k]]).tolist()
            yield SeededBatch(items, (self.seed, self.epoch, self.rank, k))
