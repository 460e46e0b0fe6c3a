"""Every metric name the registry offers, on random data, equals scikit-learn or a reference
written here: random class counts, classes absent from the targets and/or the predictions, ties,
very negative and very large scores, and uneven batches (several updates at random split points).

The tables below are keyed by task kind and metric name, and the tests walk the registry: a metric
name registered without a reference here fails."""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from torchkiln.errors import ConfigError
from torchkiln.metrics import KINDS, names_for
from torchkiln.registry import METRICS
from torchkiln.tasks import ClassificationTask, MultiLabelTask, RankingTask, RegressionTask

# KILN_PROPERTY_EXAMPLES=2000 for a deeper search than the suite's (~10 s for all four kinds)
SETTINGS = settings(max_examples=int(os.environ.get("KILN_PROPERTY_EXAMPLES", "40")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
REGIMES = ("normal", "ties", "very_negative", "very_large")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:sklearn")  # the references' ill-defined cases


def scores(rng: np.random.Generator, shape, regime: str) -> np.ndarray:
    """Model outputs (float32) of one kind: ordinary, heavily tied, near -150, or huge."""
    if regime == "ties":
        out = rng.integers(-2, 3, shape).astype(np.float64)
    elif regime == "very_negative":  # log-likelihoods
        out = -150 + 0.5 * rng.integers(0, 4, shape) + 0.01 * rng.integers(0, 2, shape)
    elif regime == "very_large":
        out = rng.normal(size=shape) * 1e4 if rng.random() < 0.5 else rng.integers(-2, 3, shape) * 1e30
    else:
        out = rng.normal(size=shape)
    return out.astype(np.float32)


def run_epoch(task, names: list[str], outputs: torch.Tensor, targets, cuts: list[int], num_classes=None):
    """Update once per batch, the batches cut at `cuts`; compute once, as the Trainer does."""
    metrics = task.build_metrics(names, num_classes)
    n = len(outputs)
    bounds = sorted({0, n, *(c for c in cuts if 0 < c < n)})
    for a, b in zip(bounds, bounds[1:]):
        part = tuple(t[a:b] for t in targets) if isinstance(targets, tuple) else targets[a:b]
        task.update_metrics(metrics, outputs[a:b], part)
    return {k: v.double().numpy() for k, v in metrics.compute().items()}


def check(got: dict, want: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)


def cut_points(n: int):
    return st.lists(st.integers(1, max(1, n - 1)), max_size=6)


# -- single-label classification -----------------------------------------------------------------
def _prf(stat: str, average: str | None, labels=None):
    index = {"precision": 0, "recall": 1, "f1": 2}[stat]

    def ref(y, pred, prob, c):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return skm.precision_recall_fscore_support(y, pred, average=average, labels=labels(c) if labels else None,
                                                       zero_division=0)[index]
    return ref


def _binary(stat: str):
    fn = {"precision": skm.precision_score, "recall": skm.recall_score, "f1": skm.f1_score}[stat]
    return lambda y, pred, prob, c: fn(y, pred, average="binary", pos_label=1, zero_division=0)


def _defined_mean(columns, scorer, need_negatives: bool) -> float:
    """The mean over the classes where the score is defined (positives, and negatives for ROC)."""
    values = [scorer(t, p) for t, p in columns if t.any() and (not need_negatives or not t.all())]
    return float(np.mean(values)) if values else 0.0


def _one_vs_rest(y, prob, c):
    return [(y == k, prob[:, k]) for k in range(c)]


def _top_k(k: int):
    def ref(y, pred, prob, c):
        # tied scores rank as argmax ranks them: the lower class index first
        ahead = [sum(1 for j in range(c) if (p[j], -j) > (p[t], -t)) for p, t in zip(prob, y)]
        return float(np.mean(np.array(ahead) < k))
    return ref


MULTICLASS: dict[str, Callable] = {
    "accuracy": lambda y, pred, prob, c: skm.accuracy_score(y, pred),
    "balanced_accuracy": lambda y, pred, prob, c: skm.balanced_accuracy_score(y, pred),
    "confusion_matrix": lambda y, pred, prob, c: skm.confusion_matrix(y, pred, labels=range(c)),
    "auroc": lambda y, pred, prob, c: _defined_mean(_one_vs_rest(y, prob, c), skm.roc_auc_score, True),
    "roc_auc": lambda y, pred, prob, c: _defined_mean(_one_vs_rest(y, prob, c), skm.roc_auc_score, True),
    "average_precision": lambda y, pred, prob, c: _defined_mean(_one_vs_rest(y, prob, c),
                                                                skm.average_precision_score, False),
    **{f"top{k}_accuracy": _top_k(k) for k in (2, 3, 5)},
    **{stat: _binary(stat) for stat in ("f1", "precision", "recall")},
    **{f"{stat}_{avg}": _prf(stat, avg) for stat in ("f1", "precision", "recall")
       for avg in ("macro", "micro", "weighted")},
    **{f"{stat}_per_class": _prf(stat, None, lambda c: list(range(c))) for stat in ("f1", "precision", "recall")},
}


def _multiclass_refusal(name: str, c: int) -> bool:
    """Names that are a config error for `c` classes."""
    if name in ("f1", "precision", "recall"):
        return c != 2
    k = int(name[3]) if name.startswith("top") else int(name.partition("@")[2] or 0)
    return k > c


@SETTINGS
@given(st.data())
def test_multiclass_metrics(data):
    c = data.draw(st.integers(2, 6), label="classes")
    n = data.draw(st.integers(1, 40), label="samples")
    present = data.draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c, unique=True), label="in targets")
    never_predicted = data.draw(st.lists(st.integers(0, c - 1), max_size=c - 1, unique=True), label="never predicted")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    y = rng.choice(present, n)
    logits = scores(rng, (n, c), data.draw(st.sampled_from(REGIMES), label="scores"))
    logits[:, never_predicted] = -3e38
    k = data.draw(st.integers(1, 6), label="k")
    names = [*names_for("multiclass"), f"accuracy@{k}"]
    refs = {**MULTICLASS, f"accuracy@{k}": _top_k(k)}
    refused = [m for m in names if _multiclass_refusal(m, c)]
    names = [m for m in names if m not in refused]
    outputs, targets = torch.from_numpy(logits), torch.from_numpy(y)
    got = run_epoch(ClassificationTask(), names, outputs, targets, data.draw(cut_points(n)), c)
    pred = outputs.argmax(1).numpy()
    prob = outputs.float().softmax(1).numpy()  # what the task hands torchmetrics
    check(got, {m: refs[m](y, pred, prob, c) for m in names})
    for m in refused:
        with pytest.raises(ConfigError, match=m.partition("@")[0]):
            ClassificationTask().build_metrics([m], c)


# -- multi-label -------------------------------------------------------------------------------
def _ml_prf(stat: str, average: str | None):
    fn = {"precision": skm.precision_score, "recall": skm.recall_score, "f1": skm.f1_score}[stat]

    def ref(y, pred, prob):  # scikit-learn's defaults: a macro average over every label
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(y, pred, average=average, zero_division=0)
    return ref


def _per_label(y, prob):
    return [(y[:, i] == 1, prob[:, i]) for i in range(y.shape[1])]


MULTILABEL: dict[str, Callable] = {
    "exact_match": lambda y, pred, prob: skm.accuracy_score(y, pred),
    "accuracy": lambda y, pred, prob: 1 - skm.hamming_loss(y, pred),
    "hamming_loss": lambda y, pred, prob: skm.hamming_loss(y, pred),
    "confusion_matrix": lambda y, pred, prob: skm.multilabel_confusion_matrix(y, pred),
    "auroc": lambda y, pred, prob: _defined_mean(_per_label(y, prob), skm.roc_auc_score, True),
    "roc_auc": lambda y, pred, prob: _defined_mean(_per_label(y, prob), skm.roc_auc_score, True),
    "average_precision": lambda y, pred, prob: _defined_mean(_per_label(y, prob), skm.average_precision_score,
                                                             False),
    **{f"{stat}_{avg}": _ml_prf(stat, None if avg == "per_class" else avg)
       for stat in ("f1", "precision", "recall") for avg in ("macro", "micro", "weighted", "per_class")},
}


@SETTINGS
@given(st.data())
def test_multilabel_metrics(data):
    labels = data.draw(st.integers(2, 5), label="labels")  # torchmetrics refuses one label
    n = data.draw(st.integers(1, 40), label="samples")
    rates = data.draw(st.lists(st.sampled_from([0.0, 0.3, 1.0]), min_size=labels, max_size=labels), label="rates")
    threshold = data.draw(st.sampled_from([0.3, 0.5, 0.7]), label="threshold")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    y = (rng.random((n, labels)) < np.array(rates)).astype(np.int64)  # labels never / always present too
    logits = scores(rng, (n, labels), data.draw(st.sampled_from(REGIMES), label="scores"))
    names = names_for("multilabel")
    outputs, targets = torch.from_numpy(logits), torch.from_numpy(y)
    task = MultiLabelTask(threshold=threshold)
    got = run_epoch(task, names, outputs, targets, data.draw(cut_points(n)), labels)
    prob = outputs.float().sigmoid().numpy()
    pred = (prob >= threshold).astype(np.int64)
    check(got, {m: MULTILABEL[m](y, pred, prob) for m in names})


# -- regression --------------------------------------------------------------------------------
REGRESSION: dict[str, Callable] = {
    "mae": skm.mean_absolute_error,
    "mse": skm.mean_squared_error,
    "rmse": skm.root_mean_squared_error,  # the mean of the per-target RMSEs
    "r2": skm.r2_score,
}


@SETTINGS
@given(st.data())
def test_regression_metrics(data):
    width = data.draw(st.integers(1, 3), label="targets")
    n = data.draw(st.integers(2, 40), label="samples")
    offset = data.draw(st.sampled_from([0.0, -150.0, 1e3, 1e4]), label="offset")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    y = (offset + rng.normal(size=(n, width)) * data.draw(st.sampled_from([0.0, 1e-2, 1.0, 100.0]))).astype(np.float32)
    pred = (y + rng.normal(size=(n, width)) * data.draw(st.sampled_from([0.0, 0.1, 10.0]))).astype(np.float32)
    if width == 1:
        y, pred = y[:, 0], pred[:, 0]
    names = names_for("regression")
    got = run_epoch(RegressionTask(targets=width), names, torch.from_numpy(pred), torch.from_numpy(y),
                    data.draw(cut_points(n)))
    yt, yp = y.astype(np.float64), pred.astype(np.float64)
    check(got, {m: REGRESSION[m](yt, yp) for m in names}, rtol=1e-6, atol=1e-9)


# -- ranking -----------------------------------------------------------------------------------
def _within(ranked, k):
    return ranked[: len(ranked) if k is None else k]


def _rr(ranked, k):
    hits = np.nonzero(_within(ranked, k) > 0)[0]
    return 1.0 / (hits[0] + 1) if len(hits) else 0.0


def _ap(ranked, k):
    hits = np.nonzero(_within(ranked, k) > 0)[0]
    relevant = min((ranked > 0).sum(), len(ranked) if k is None else k)
    return sum((i + 1) / (p + 1) for i, p in enumerate(hits)) / relevant if len(hits) else 0.0


def _dcg(gains, k):
    top = _within(gains, k)
    return float((top / np.log2(np.arange(len(top)) + 2)).sum())


def _ndcg(ranked, k):
    ideal = _dcg(np.sort(ranked)[::-1], k)
    return _dcg(ranked, k) / ideal if ideal > 0 else 0.0


RANKING: dict[str, Callable] = {
    "mrr": _rr,
    "map": _ap,
    "ndcg": _ndcg,
    "hit_rate": lambda ranked, k: float((_within(ranked, k) > 0).any()),
    "precision_at": lambda ranked, k: (_within(ranked, k) > 0).sum() / (len(ranked) if k is None else k),
    "recall_at": lambda ranked, k: (_within(ranked, k) > 0).sum() / max(1, (ranked > 0).sum()),
}


def tied_orders(s: np.ndarray):
    """Every order that sorts `s` from high to low: the product of the orders of each tie group."""
    groups = [np.nonzero(s == v)[0] for v in sorted(set(s.tolist()), reverse=True)]
    for parts in itertools.product(*(itertools.permutations(g) for g in groups)):
        yield np.concatenate(parts)


def expected_over_ties(measure: Callable, s: np.ndarray, rel: np.ndarray, k: int | None) -> float:
    return float(np.mean([measure(rel[order], k) for order in tied_orders(s)]))


@SETTINGS
@given(st.data())
def test_ranking_metrics(data):
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=8), label="query sizes")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    regime = data.draw(st.sampled_from(REGIMES), label="scores")
    ids = rng.choice(10**9, len(sizes), replace=False)
    query = np.repeat(ids, sizes)
    n = len(query)
    rel = rng.integers(0, 3, n).astype(np.float32) * (rng.random(n) < 0.5)
    rel[query == ids[0]] = 0  # a query without a relevant item
    s = scores(rng, n, regime)
    perm = rng.permutation(n)  # queries spread over the batches
    query, rel, s = query[perm], rel[perm], s[perm]
    k = data.draw(st.integers(1, 6), label="k")
    names = [*names_for("ranking"), *(f"{m}@{k}" for m in names_for("ranking"))]
    targets = (torch.from_numpy(rel), torch.from_numpy(query))
    got = run_epoch(RankingTask(), names, torch.from_numpy(s), targets, data.draw(cut_points(n)))
    want = {}
    for name in names:
        base, _, top = name.partition("@")
        want[name] = np.mean([expected_over_ties(RANKING[base], s[query == q].astype(np.float64), rel[query == q],
                                                 int(top) if top else None) for q in ids])
    check(got, want)
    # NDCG's convention is scikit-learn's (ties averaged), on the queries sklearn accepts (2+ items)
    for q in ids:
        m = query == q
        if m.sum() > 1 and rel[m].any():
            want_q = skm.ndcg_score(rel[m][None], s[m].astype(np.float64)[None], k=k)
            assert expected_over_ties(_ndcg, s[m].astype(np.float64), rel[m], k) == pytest.approx(want_q, abs=1e-9)


REFERENCES = {"multiclass": MULTICLASS, "multilabel": MULTILABEL, "regression": REGRESSION, "ranking": RANKING}


def test_every_registered_metric_name_has_a_reference():
    """A name added to the registry without a reference in this file fails here."""
    assert set(REFERENCES) == set(KINDS)
    covered = set()
    for kind in KINDS:
        missing = set(names_for(kind)) - set(REFERENCES[kind])
        assert not missing, f"no reference for {kind} metrics {sorted(missing)}"
        covered |= set(names_for(kind))
    assert set(METRICS.names()) <= covered
