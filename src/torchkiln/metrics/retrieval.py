"""Ranking metrics grouped by query: exact in float64, independent of sample order and batching.

torchmetrics' retrieval classes cast scores to float32 (scores near -150 then underflow once mapped
to positive values) and break ties by the order samples arrived in. Here every metric keeps the
epoch's scores, relevance and query ids (concatenated over batches and, under DDP, over ranks) and
computes each query's value from the sorted scores.

Tied scores: each metric is its **expected value over all orders of the tied items**, every order
equally likely (scikit-learn's `ndcg_score` with `ignore_ties=False` does the same for NDCG). So
shuffling the samples, or splitting them into other batches, gives the same result, and a model
that scores everything alike gets what a random order would get, not a lucky or unlucky tie-break.

Per query, with k the `top_k` (or the query's length) and relevant meaning relevance > 0:
  mrr        1 / rank of the first relevant item (0 when none ranks within k)
  map        sum over relevant items within k of precision at their rank, / min(relevant, k)
  ndcg       DCG@k / ideal DCG@k with gains = relevance (graded), discount 1 / log2(rank + 1)
  hit_rate   1 if a relevant item ranks within k
  precision  relevant items within k / k
  recall     relevant items within k / relevant items
A query without a relevant item scores 0; the result is the mean over queries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchkiln.metrics.base import Metric

MEASURES = ("mrr", "map", "ndcg", "hit_rate", "precision", "recall")


class RankingMetric(Metric):
    """`measure` (one of MEASURES) at `top_k` (None: the whole list), averaged over queries.

    `update(preds, target, indexes)`: scores (N,), relevance (N,) (graded or 0/1), query ids (N,).
    """

    higher_is_better = True

    def __init__(self, measure: str = "ndcg", top_k: int | None = None):
        super().__init__()
        if measure not in MEASURES:
            raise ValueError(f"measure: expected one of {', '.join(MEASURES)}; found {measure!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k: expected a positive integer or None; found {top_k!r}")
        self.measure = measure
        self.top_k = top_k
        self.add_state("preds", [], "cat")
        self.add_state("target", [], "cat")
        self.add_state("indexes", [], "cat")

    def update(self, preds: Tensor, target: Tensor, indexes: Tensor) -> None:
        preds, target, indexes = preds.reshape(-1), target.reshape(-1), indexes.reshape(-1)
        if not preds.shape == target.shape == indexes.shape:
            raise ValueError(f"{len(preds)} scores, {len(target)} relevance values and {len(indexes)} query ids")
        self.preds.append(preds.detach().double())
        self.target.append(target.detach().double())
        self.indexes.append(indexes.detach().long())

    def score(self) -> Tensor:
        if not self.preds:
            return torch.tensor(0.0)
        scores, rel, query = torch.cat(self.preds), torch.cat(self.target), torch.cat(self.indexes)
        return ranking_score(scores, rel, query, self.measure, self.top_k).float()


def _sorted(scores: Tensor, query: Tensor) -> Tensor:
    """The order that sorts by query, then by score from high to low."""
    order = torch.argsort(-scores, stable=True)
    return order[torch.argsort(query[order], stable=True)]


def _log_comb(n: Tensor, k: Tensor) -> Tensor:
    """log C(n, k) for float tensors, -inf where k > n or k < 0."""
    ok = (k >= 0) & (k <= n)
    n, k = n.clamp(min=0), k.clamp(min=0)
    value = torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma((n - k).clamp(min=0) + 1)
    return torch.where(ok, value, torch.full_like(value, -torch.inf))


def ranking_score(scores: Tensor, rel: Tensor, query: Tensor, measure: str, top_k: int | None = None) -> Tensor:
    """The mean over queries of `measure` (see the module's docstring), float64."""
    order = _sorted(scores, query)
    scores, rel, query = scores[order].double(), rel[order].double(), query[order]
    n = len(scores)
    _, qi, qlen = torch.unique_consecutive(query, return_inverse=True, return_counts=True)
    nq = len(qlen)
    pos = torch.arange(n, device=scores.device) - (torch.cumsum(qlen, 0) - qlen)[qi]  # 0-based rank
    k = (qlen if top_k is None else torch.full_like(qlen, top_k)).double()  # per query
    hit = (rel > 0).double()
    relevant = torch.zeros(nq, dtype=torch.float64, device=scores.device).index_add_(0, qi, hit)

    # Tie groups: runs of equal scores within a query.
    first = torch.ones(n, dtype=torch.bool, device=scores.device)
    first[1:] = (query[1:] != query[:-1]) | (scores[1:] != scores[:-1])
    gi = torch.cumsum(first.long(), 0) - 1
    g_size = torch.bincount(gi).double()
    g_rel = torch.zeros(len(g_size), dtype=torch.float64, device=scores.device).index_add_(0, gi, hit)
    g_start = pos[first].double()  # rank of the group's first item
    before = (torch.cumsum(hit, 0) - hit)[first] - (torch.cumsum(relevant, 0) - relevant)[qi[first]]
    m, r, a, c = g_size[gi], g_rel[gi], g_start[gi], before[gi]  # per item: its group's figures
    t = pos.double() - a + 1  # place within the group, 1..m
    rank = pos.double() + 1
    within = rank <= k[qi]

    def per_query(values: Tensor) -> Tensor:
        return torch.zeros(nq, dtype=torch.float64, device=scores.device).index_add_(0, qi, values * within)

    if measure == "ndcg":
        discount = 1.0 / torch.log2(rank + 1)
        g_gain = torch.zeros(len(g_size), dtype=torch.float64, device=scores.device).index_add_(0, gi, rel)
        dcg = per_query(g_gain[gi] / m * discount)  # a tie group's mean gain at each of its ranks
        ideal = rel[_sorted(rel, query)]
        idcg = per_query(ideal * discount)
        value = torch.where(idcg > 0, dcg / idcg.clamp(min=1e-300), torch.zeros_like(dcg))
    elif measure == "mrr":
        # In the first group holding a relevant item, P(first relevant at place t) = C(m-t, r-1) / C(m, r).
        lead = (c == 0) & (r > 0)
        p = torch.exp(_log_comb(m - t, r - 1) - _log_comb(m, r))
        value = per_query(torch.where(lead, p / rank, torch.zeros_like(p)))
    elif measure == "map":
        # E[relevant(rank) * relevant at or above it] / rank, over the orders of the item's group.
        pair = torch.where(m > 1, r * (r - 1) / (m * (m - 1)).clamp(min=1), torch.zeros_like(m))
        value = per_query((r / m * (c + 1) + (t - 1) * pair) / rank)
        value = value / torch.minimum(relevant, k).clamp(min=1)
    else:
        # s = places of a tie group within the top k; the group puts s * r / m relevant items there.
        g_k = k[qi[first]]
        s = (torch.minimum(g_start + g_size, g_k) - g_start).clamp(min=0)
        g_q = qi[first]
        if measure == "hit_rate":  # 1 - P(no relevant item in any group's s places)
            log_none = _log_comb(g_size - g_rel, s) - _log_comb(g_size, s)
            none = torch.zeros(nq, dtype=torch.float64, device=scores.device).index_add_(0, g_q, log_none)
            value = 1 - torch.exp(none)
        else:
            found = torch.zeros(nq, dtype=torch.float64, device=scores.device).index_add_(0, g_q, s * g_rel / g_size)
            value = found / (k if measure == "precision" else relevant.clamp(min=1))
    value = torch.where(relevant > 0, value, torch.zeros_like(value))
    return value.mean()
