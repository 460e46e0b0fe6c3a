"""Every metric equals scikit-learn's over all samples of an epoch fed in uneven batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from torchkiln.errors import ConfigError
from torchkiln.metrics import build_metrics
from torchkiln.tasks import ClassificationTask, MultiLabelTask, RankingTask, RegressionTask

SIZES = [1, 7, 33, 2, 64, 5, 18]  # uneven: a mean of batch means would differ


def batches(n: int):
    start = 0
    for size in SIZES * 10:
        if start >= n:
            return
        yield slice(start, min(start + size, n))
        start += size


def epoch(task, specs, outputs, targets, num_classes=None):
    """Feed every batch through the task's metric update, as the Trainer does; compute once."""
    metrics = task.build_metrics(specs, num_classes)
    for sl in batches(len(outputs)):
        tg = tuple(t[sl] for t in targets) if isinstance(targets, tuple) else targets[sl]
        task.update_metrics(metrics, outputs[sl], tg)
    return {k: v.numpy() for k, v in metrics.compute().items()}


def softmax(x):
    return torch.as_tensor(x).softmax(1).numpy()


@pytest.fixture
def multiclass():
    g = torch.Generator().manual_seed(0)
    n, c = 150, 5
    y = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + 1.5 * torch.nn.functional.one_hot(y, c)
    return logits, y


def test_multiclass_metrics_equal_sklearn(multiclass):
    logits, y = multiclass
    specs = ["accuracy", "balanced_accuracy", "top2_accuracy", "accuracy@3", "auroc", "average_precision",
             "confusion_matrix"] + [f"{m}_{a}" for m in ("precision", "recall", "f1")
                                    for a in ("macro", "micro", "weighted", "per_class")]
    got = epoch(ClassificationTask(), specs, logits, y, 5)
    yt, pred, prob = y.numpy(), logits.argmax(1).numpy(), softmax(logits)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(yt, pred), abs=1e-6)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(yt, pred), abs=1e-6)
    assert got["top2_accuracy"] == pytest.approx(skm.top_k_accuracy_score(yt, prob, k=2), abs=1e-6)
    assert got["accuracy@3"] == pytest.approx(skm.top_k_accuracy_score(yt, prob, k=3), abs=1e-6)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(yt, prob, multi_class="ovr"), abs=1e-5)
    ap = np.mean([skm.average_precision_score(yt == k, prob[:, k]) for k in range(5)])
    assert got["average_precision"] == pytest.approx(ap, abs=1e-5)
    np.testing.assert_array_equal(got["confusion_matrix"], skm.confusion_matrix(yt, pred))
    for avg in ("macro", "micro", "weighted", None):
        p, r, f, _ = skm.precision_recall_fscore_support(yt, pred, average=avg, zero_division=0)
        key = avg or "per_class"
        np.testing.assert_allclose(got[f"precision_{key}"], p, atol=1e-6)
        np.testing.assert_allclose(got[f"recall_{key}"], r, atol=1e-6)
        np.testing.assert_allclose(got[f"f1_{key}"], f, atol=1e-6)


def test_class_absent_from_the_epoch_matches_sklearn_defaults():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (60,), generator=g)  # class 3 never occurs, nor is it predicted
    logits = torch.randn(60, 4, generator=g)
    logits[:, 3] = -10
    got = epoch(ClassificationTask(), ["f1_macro", "precision_macro", "recall_weighted", "accuracy"], logits, y, 4)
    yt, pred = y.numpy(), logits.argmax(1).numpy()
    p, r, f, _ = skm.precision_recall_fscore_support(yt, pred, average="macro", zero_division=0)
    assert got["f1_macro"] == pytest.approx(f, abs=1e-6)
    assert got["precision_macro"] == pytest.approx(p, abs=1e-6)
    assert got["recall_weighted"] == pytest.approx(skm.recall_score(yt, pred, average="weighted"), abs=1e-6)


def test_single_sample_and_ties():
    task = ClassificationTask()
    got = epoch(task, ["accuracy", "f1_macro"], torch.tensor([[0.1, 2.0, 0.3]]), torch.tensor([1]), 3)
    assert got["accuracy"] == 1.0 and got["f1_macro"] == 1.0
    # Tied scores: a binary-like AUROC with ties equals sklearn's (ties count one half).
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 2, (80,), generator=g)
    score = torch.randint(0, 3, (80,), generator=g).float()  # many ties
    logits = torch.stack([-score, score], 1) / 2
    got = epoch(task, ["auroc"], logits, y, 2)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y.numpy(), softmax(logits)[:, 1]), abs=1e-6)


def test_multilabel_metrics_equal_sklearn():
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 2, (120, 4), generator=g).float()
    logits = torch.randn(120, 4, generator=g) + 1.2 * (2 * y - 1)
    specs = ["exact_match", "accuracy", "hamming_loss", "f1_macro", "f1_micro", "precision_weighted",
             "recall_per_class", "auroc", "average_precision"]
    task = MultiLabelTask(threshold=0.4)
    got = epoch(task, specs, logits, y, 4)
    yt, prob = y.numpy().astype(int), logits.sigmoid().numpy()
    pred = (prob >= 0.4).astype(int)
    assert got["exact_match"] == pytest.approx(skm.accuracy_score(yt, pred), abs=1e-6)
    assert got["accuracy"] == pytest.approx(1 - skm.hamming_loss(yt, pred), abs=1e-6)
    assert got["hamming_loss"] == pytest.approx(skm.hamming_loss(yt, pred), abs=1e-6)
    assert got["f1_macro"] == pytest.approx(skm.f1_score(yt, pred, average="macro"), abs=1e-6)
    assert got["f1_micro"] == pytest.approx(skm.f1_score(yt, pred, average="micro"), abs=1e-6)
    assert got["precision_weighted"] == pytest.approx(skm.precision_score(yt, pred, average="weighted"), abs=1e-6)
    np.testing.assert_allclose(got["recall_per_class"], skm.recall_score(yt, pred, average=None), atol=1e-6)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(yt, prob, average="macro"), abs=1e-5)
    assert got["average_precision"] == pytest.approx(skm.average_precision_score(yt, prob, average="macro"), abs=1e-5)


@pytest.mark.parametrize("outputs", [1, 3])
def test_regression_metrics_equal_sklearn(outputs):
    g = torch.Generator().manual_seed(4)
    y = torch.randn(130, outputs, generator=g) * 3
    pred = y + torch.randn(130, outputs, generator=g)
    if outputs == 1:
        y = y.squeeze(1)
    got = epoch(RegressionTask(targets=outputs), ["mae", "mse", "rmse", "r2"], pred, y)
    yt, yp = y.numpy(), pred.numpy().reshape(y.shape)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(yt, yp), rel=1e-5)
    assert got["mse"] == pytest.approx(skm.mean_squared_error(yt, yp), rel=1e-5)
    # several targets: the mean of the per-target RMSEs, scikit-learn's uniform_average
    assert got["rmse"] == pytest.approx(skm.root_mean_squared_error(yt, yp), rel=1e-5)
    assert got["r2"] == pytest.approx(skm.r2_score(yt, yp), rel=1e-5)


def _ranking_data(seed: int, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    groups, rel, scores = [], [], []
    for q in range(25):
        k = int(torch.randint(1, 9, (1,), generator=g))  # uneven query sizes, one-item queries too
        r = torch.randint(0, 3, (k,), generator=g).float()
        if q % 6 == 5:
            r.zero_()  # a query with no relevant item
        s = torch.randn(k, generator=g) * 2 - 1  # negative scores too
        if ties:
            s = torch.randint(0, 3, (k,), generator=g).float()
        groups.append(torch.full((k,), q))
        rel.append(r)
        scores.append(s + r * 0.8)
    groups, rel, scores = torch.cat(groups), torch.cat(rel), torch.cat(scores)
    perm = torch.randperm(len(groups), generator=g)  # queries spread across batches
    return scores[perm], rel[perm], groups[perm]


def _per_query(scores, rel, groups):
    for q in torch.unique(groups):
        m = groups == q
        yield scores[m].numpy().astype(np.float64), rel[m].numpy()


def _mrr(s, r):
    order = np.argsort(-s, kind="stable")
    hits = np.nonzero(r[order] > 0)[0]
    return 1.0 / (hits[0] + 1) if len(hits) else 0.0


def _hit(s, r, k):
    return float((r[np.argsort(-s, kind="stable")[:k]] > 0).any())


def _ndcg(s, r, k=None):
    if len(s) == 1:  # sklearn refuses one-document queries: NDCG is 1 if relevant, else 0
        return float(r[0] > 0)
    return skm.ndcg_score(r[None], s[None], k=k) if r.sum() > 0 else 0.0


def test_ranking_metrics_grouped_by_query():
    scores, rel, groups = _ranking_data(5)
    got = epoch(RankingTask(), ["ndcg", "ndcg@3", "map", "mrr", "hit_rate@2"], scores, (rel, groups))
    queries = list(_per_query(scores, rel, groups))
    assert got["ndcg"] == pytest.approx(np.mean([_ndcg(s, r) for s, r in queries]), abs=1e-5)
    assert got["ndcg@3"] == pytest.approx(np.mean([_ndcg(s, r, 3) for s, r in queries]), abs=1e-5)
    ap = [skm.average_precision_score(r > 0, s) if (r > 0).any() else 0.0 for s, r in queries]
    assert got["map"] == pytest.approx(np.mean(ap), abs=1e-5)
    assert got["mrr"] == pytest.approx(np.mean([_mrr(s, r) for s, r in queries]), abs=1e-5)
    assert got["hit_rate@2"] == pytest.approx(np.mean([_hit(s, r, 2) for s, r in queries]), abs=1e-5)


def test_ndcg_with_tied_scores_equals_sklearn():
    scores, rel, groups = _ranking_data(6, ties=True)
    got = epoch(RankingTask(), ["ndcg"], scores, (rel, groups))
    expected = np.mean([_ndcg(s, r) for s, r in _per_query(scores, rel, groups)])
    assert got["ndcg"] == pytest.approx(expected, abs=1e-5)


def test_metric_for_the_wrong_task_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="'mae' does not apply to a multiclass task"):
        build_metrics(["mae"], 10)
    with pytest.raises(ConfigError, match="positive integer"):
        build_metrics(["ndcg@x"], None, kind="ranking")


def test_confusion_metrics_leave_out_ignored_targets_and_refuse_foreign_ones():
    """accuracy/precision/recall/F1 come from one confusion matrix: targets below 0 (the loss's
    ignore_index) are left out, as sklearn sees only the rest; a target >= num_classes is an error."""
    from torchkiln.metrics.confusion import ConfusionMetric

    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 4, (90,), generator=g)
    logits = torch.randn(90, 4, generator=g) + torch.nn.functional.one_hot(y, 4)
    y_ignored = y.clone()
    y_ignored[::7] = -100
    specs = ["accuracy", "f1_macro", "recall_weighted", "precision_per_class"]
    got = epoch(ClassificationTask(), specs, logits, y_ignored, 4)
    keep = (y_ignored >= 0).numpy()
    yt, pred = y.numpy()[keep], logits.argmax(1).numpy()[keep]
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(yt, pred), abs=1e-6)
    assert got["f1_macro"] == pytest.approx(skm.f1_score(yt, pred, average="macro", zero_division=0), abs=1e-6)
    assert got["recall_weighted"] == pytest.approx(skm.recall_score(yt, pred, average="weighted"), abs=1e-6)
    np.testing.assert_allclose(got["precision_per_class"],
                               skm.precision_score(yt, pred, average=None, zero_division=0), atol=1e-6)

    m = ConfusionMetric(4)
    m.update(logits[:5], torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="num_classes=4"):
        m.compute()
    # torchkiln's (no torchmetrics import); asked for with torchmetrics' own arguments, torchmetrics' class
    assert type(build_metrics(["f1_macro"], 4)["f1_macro"]).__name__ == "ConfusionMetric"
    other = build_metrics([{"type": "f1_macro", "args": {"ignore_index": 0}}], 4)["f1_macro"]
    assert type(other).__name__ == "MulticlassF1Score" and other.ignore_index == 0


def test_balanced_accuracy_ignores_a_class_only_predicted():
    """scikit-learn: the mean recall over the classes in the targets (a class predicted but absent
    from the targets has no recall); torchmetrics' macro accuracy counted it as 0 (0.50)."""
    y, pred = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 1, 1])
    got = epoch(ClassificationTask(), ["balanced_accuracy"], torch.nn.functional.one_hot(pred, 3).float(), y, 3)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred)) == 0.75
    # with torchmetrics-style arguments it is still scikit-learn's quantity
    built = build_metrics([{"type": "balanced_accuracy", "args": {"ignore_index": 1}}], 3)
    built.update(pred, y)
    assert float(built.compute()["balanced_accuracy"]) == pytest.approx(skm.balanced_accuracy_score([0, 0], [0, 2]))


def test_ranking_metrics_with_very_negative_scores():
    """Log-likelihoods near -150 underflowed through exp in float32: MRR 0, NDCG wrong."""
    scores, rel, groups = _ranking_data(7)
    names = ["mrr", "ndcg", "map", "hit_rate@2", "precision_at@3", "recall_at@3"]
    shifted = epoch(RankingTask(), names, scores - 150, (rel, groups))
    plain = epoch(RankingTask(), names, scores, (rel, groups))
    queries = list(_per_query(scores, rel, groups))
    assert shifted["mrr"] == pytest.approx(np.mean([_mrr(s, r) for s, r in queries]), abs=1e-6)
    assert shifted["ndcg"] == pytest.approx(np.mean([_ndcg(s, r) for s, r in queries]), abs=1e-6)
    for name in names:
        assert shifted[name] == pytest.approx(plain[name], abs=1e-7), name
    huge = epoch(RankingTask(), names, scores * 1e30, (rel, groups))  # no overflow either
    for name in names:
        assert huge[name] == pytest.approx(plain[name], abs=1e-7), name


def _expected_over_tied_orders(s, r, measure):
    """The reference convention, by brute force: the mean over every order of the scores that
    sorts them from high to low (ties in every order, all equally likely)."""
    import itertools

    values = []
    for perm in itertools.permutations(range(len(s))):
        if all(s[perm[i]] >= s[perm[i + 1]] for i in range(len(perm) - 1)):
            values.append(measure(np.asarray(r)[list(perm)]))
    return float(np.mean(values))


def _rr(ranked):
    hits = np.nonzero(ranked > 0)[0]
    return 1.0 / (hits[0] + 1) if len(hits) else 0.0


def _ap(ranked):
    hits = np.nonzero(ranked > 0)[0]
    return float(np.mean([(i + 1) / (p + 1) for i, p in enumerate(hits)])) if len(hits) else 0.0


def test_mrr_and_map_with_ties_are_the_expected_value_and_ignore_sample_order():
    """Tied scores: the expected value over the tied items' orders; shuffling samples or changing
    the batch split gives the same numbers (torchmetrics' answer depended on arrival order)."""
    g = torch.Generator().manual_seed(8)
    groups = torch.arange(30).repeat_interleave(5)
    rel = (torch.rand(150, generator=g) < 0.35).float()
    scores = torch.randint(0, 2, (150,), generator=g).float()  # heavy ties
    queries = [(scores[groups == q].numpy(), rel[groups == q].numpy()) for q in range(30)]
    want = {"mrr": np.mean([_expected_over_tied_orders(s, r, _rr) for s, r in queries]),
            "map": np.mean([_expected_over_tied_orders(s, r, _ap) for s, r in queries])}
    results = []
    for seed in range(3):
        perm = torch.randperm(150, generator=torch.Generator().manual_seed(seed))
        results.append(epoch(RankingTask(), ["mrr", "map"], scores[perm], (rel[perm], groups[perm])))
    one = RankingTask().build_metrics(["mrr", "map"], None)
    RankingTask().update_metrics(one, scores, (rel, groups))  # one batch, original order
    results.append({k: v.numpy() for k, v in one.compute().items()})
    for got in results:
        assert got["mrr"] == pytest.approx(want["mrr"], abs=1e-6)
        assert got["map"] == pytest.approx(want["map"], abs=1e-6)
        assert got == results[0]


def test_r2_keeps_its_digits_on_targets_with_a_large_offset():
    """float32 running sums drifted ~1e-4 on targets near 100 (1.8e-2 near 1000)."""
    g = torch.Generator().manual_seed(9)
    for offset in (1e2, 1e3, 1e4):
        y = offset + torch.randn(1200, generator=g)
        pred = y + 0.3 * torch.randn(1200, generator=g)
        got = epoch(RegressionTask(), ["r2", "mse", "rmse", "mae"], pred, y)
        yt, yp = y.double().numpy(), pred.double().numpy()
        assert got["r2"] == pytest.approx(skm.r2_score(yt, yp), abs=1e-8)
        assert got["mse"] == pytest.approx(skm.mean_squared_error(yt, yp), rel=1e-6)


def test_common_metric_names_and_binary_scores():
    g = torch.Generator().manual_seed(10)
    y = torch.randint(0, 2, (90,), generator=g)
    logits = torch.randn(90, 2, generator=g) + torch.nn.functional.one_hot(y, 2)
    got = epoch(ClassificationTask(), ["roc_auc", "auroc", "f1", "precision", "recall"], logits, y, 2)
    yt, pred, prob = y.numpy(), logits.argmax(1).numpy(), softmax(logits)[:, 1]
    assert got["roc_auc"] == got["auroc"] == pytest.approx(skm.roc_auc_score(yt, prob), abs=1e-6)
    assert got["f1"] == pytest.approx(skm.f1_score(yt, pred), abs=1e-6)
    assert got["precision"] == pytest.approx(skm.precision_score(yt, pred), abs=1e-6)
    assert got["recall"] == pytest.approx(skm.recall_score(yt, pred), abs=1e-6)
    with pytest.raises(ConfigError, match="binary score of class 1 of two classes; this model has 5"
                                          ".*f1_macro"):
        build_metrics(["f1"], 5)


def test_unknown_metric_lists_the_valid_names():
    with pytest.raises(ConfigError) as err:
        build_metrics(["roc"], 4, where="metrics")
    message = str(err.value)
    assert "unknown metric 'roc'" in message and "did you mean 'auroc'" in message
    from torchkiln.metrics import names_for

    assert f"metrics for a multiclass task: {', '.join(names_for('multiclass'))};" in message
    assert "\n" not in message


def _sync_cases():
    """(task, names, outputs, targets, num_classes) covering torchkiln's own metric classes."""
    g = torch.Generator().manual_seed(11)
    y = torch.randint(0, 4, (90,), generator=g)
    logits = torch.randint(-2, 3, (90, 4), generator=g).float()
    reg_y = 1e3 + torch.randn(90, 2, generator=g)
    scores, rel, groups = _ranking_data(12, ties=True)
    return [
        (ClassificationTask(), ["balanced_accuracy", "f1_macro", "auroc", "average_precision", "accuracy@2"],
         logits, y, 4),
        (RegressionTask(targets=2), ["r2", "rmse", "mse"], reg_y + torch.randn(90, 2, generator=g), reg_y, None),
        (RankingTask(), ["ndcg@3", "map", "mrr", "hit_rate@2", "precision_at@2", "recall_at"], scores,
         (rel, groups), None),
    ]


def _part(targets, sl):
    return tuple(t[sl] for t in targets) if isinstance(targets, tuple) else targets[sl]


def _sync_worker(rank: int, world: int, out: str) -> None:
    import json
    from pathlib import Path

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{Path(out, 'rendezvous')}", rank=rank, world_size=world)
    results = []
    for task, names, outputs, targets, c in _sync_cases():
        metrics = task.build_metrics(names, c)
        share = slice(0, 31) if rank == 0 else slice(31, None)  # uneven shares
        task.update_metrics(metrics, outputs[share], _part(targets, share))
        results.append({k: float(v) for k, v in metrics.compute().items()})
    if rank == 0:
        Path(out, "synced.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_own_metric_classes_sync_across_processes(tmp_path):
    """Two gloo processes with uneven shares compute what one process computes over all samples."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    synced = json.loads((tmp_path / "synced.json").read_text())
    for (task, names, outputs, targets, c), got in zip(_sync_cases(), synced):
        want = epoch(task, names, outputs, targets, c)
        for name in names:
            assert got[name] == pytest.approx(float(want[name]), abs=1e-6), name
