"""Ranking: one score per sample, samples grouped by a query id; metrics are computed per query."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchkiln.errors import DataError
from torchkiln.registry import TASKS
from torchkiln.tasks.base import Task, dict_input


def positive_scores(scores: torch.Tensor) -> torch.Tensor:
    """A strictly increasing map onto (0, inf): exp(s) below 0, 1 + s above (float64, no overflow).

    For a user's torchmetrics retrieval class (by import path), which counts an item whose score is
    <= 0 as not retrieved; torchkiln's own ranking metrics take the scores as they are.
    """
    s = scores.double()
    return torch.where(s < 0, s.clamp(max=0).exp(), s + 1)


@TASKS.register(name="ranking")
class RankingTask(Task):
    """A batch is (inputs, relevance, query_id) or {input, target, group}; outputs are scores (N,) or (N, 1).

    Relevance may be graded (0, 1, 2, ...): NDCG uses the grades, MRR / MAP / hit rate count
    relevance > 0 as relevant. Metrics gather every sample of the epoch and group them by query id,
    so a query split across batches is still scored as one list; tied scores give the expected
    value over the tied items' orders (torchkiln.metrics.retrieval). Listwise losses (`grouped = True`,
    like ListNetLoss) get (scores, relevance, query_id); others get (scores, relevance).
    """

    name = "ranking"
    default_loss = "ListNetLoss"
    default_metrics = ("ndcg@10", "map", "mrr")
    metric_kind = "ranking"
    group_keys = ("group", "query", "qid")

    def split_batch(self, batch: Any) -> tuple[Any, Any]:
        if isinstance(batch, dict):
            group = next((batch[k] for k in self.group_keys if k in batch), None)
            target = batch.get("target")
            inputs = dict_input(batch, "'input', 'target' and a query id (group, query or qid)")
        else:
            if len(batch) < 3:
                raise DataError("ranking: a batch must be (inputs, relevance, query_id) or a dict with"
                                " input, target and group; the dataset gave "
                                f"{len(batch)} item(s) per sample")
            inputs, target, group = batch[0], batch[1], batch[2]
        if target is None:
            return inputs, None
        if group is None:
            raise DataError(f"ranking: the batch has no query id (one of the keys {', '.join(self.group_keys)})")
        return inputs, (target, group)

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        inputs, targets = self.split_batch(batch)
        return model(inputs).reshape(-1), targets

    def num_outputs(self, num_classes: int | None) -> int | None:
        return 1

    def loss(self, loss_fn: nn.Module, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        relevance, group = targets
        if getattr(loss_fn, "grouped", False):
            return loss_fn(outputs, relevance, group)
        return loss_fn(outputs, relevance.to(outputs.dtype).reshape(outputs.shape))

    def update_metrics(self, metrics: Any, outputs: torch.Tensor, targets: Any) -> None:
        from torchkiln.metrics.retrieval import RankingMetric

        relevance, group = targets
        scores = outputs.detach().reshape(-1).double()
        relevance, group = relevance.reshape(-1), group.reshape(-1).long()
        for _, metric in metrics.items(keep_base=True):
            if isinstance(metric, RankingMetric):  # graded relevance; float64 scores; ties by expectation
                metric.update(scores, relevance, indexes=group)
            else:  # a torchmetrics retrieval class (torchmetrics is imported already: the metric is one)
                from torchmetrics.retrieval import RetrievalNormalizedDCG

                graded = isinstance(metric, RetrievalNormalizedDCG)
                metric.update(positive_scores(scores), relevance.float() if graded else relevance > 0, indexes=group)
