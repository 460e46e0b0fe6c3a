"""The one per-class computation (metrics/confusion.py), its rows and CSV writer
(metrics/per_class.py), and the plots' best epoch by the one improvement rule."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from torchkiln.loggers.plots import ClassificationPlots
from torchkiln.loggers.validation import ValidationSample
from torchkiln.metrics.confusion import confusion_matrix, per_class_scores
from torchkiln.metrics.per_class import per_class_rows, write_per_class_csv
from torchkiln.tasks.base import ReportView


def _report(y, pred, labels):
    return skm.classification_report(y, pred, labels=labels, output_dict=True, zero_division=0)


def test_per_class_rows_agree_with_sklearn_single_label():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 5, 300))
    pred[pred == 4] = 3  # class 4 never predicted: precision 0, not undefined
    y[y == 2] = 1  # class 2 never occurs, only predicted
    rows, cm = per_class_rows(ReportView("", "multiclass", torch.as_tensor(pred), torch.as_tensor(y), 5))
    assert cm.tolist() == skm.confusion_matrix(y, pred, labels=range(5)).tolist()
    expected = _report(y, pred, list(range(5)))
    for r in rows:
        want = expected[r["class"]]
        for k, sk in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert r[k] == pytest.approx(want[sk], abs=1e-12), (r["class"], k)
        assert r["support"] == want["support"]
    scores = per_class_scores(confusion_matrix(torch.as_tensor(pred), torch.as_tensor(y), 5))
    p, rc, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(5), zero_division=0)
    np.testing.assert_allclose(scores["precision"], p)
    np.testing.assert_allclose(scores["recall"], rc)
    np.testing.assert_allclose(scores["f1"], f)
    np.testing.assert_array_equal(scores["support"], s)


def test_per_class_rows_agree_with_sklearn_multilabel():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (200, 4))
    pred = np.where(rng.random((200, 4)) < 0.7, y, 1 - y)
    rows, cm = per_class_rows(ReportView("", "multilabel", torch.as_tensor(pred), torch.as_tensor(y), 4))
    assert cm is None
    expected = _report(y, pred, list(range(4)))
    for r in rows:
        want = expected[r["class"]]
        assert r["f1"] == pytest.approx(want["f1-score"], abs=1e-12)
        assert r["precision"] == pytest.approx(want["precision"], abs=1e-12)
        assert r["support"] == want["support"]


def test_confusion_matrix_leaves_out_ignored_and_foreign_targets():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 0]), torch.tensor([0, -100, 1, 3]), 2)
    assert cm.tolist() == [[1, 0], [0, 1]]


def test_one_csv_writer_for_kiln_test_and_plots(tmp_path):
    rows, _ = per_class_rows(ReportView("", "multiclass", torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2))
    path = write_per_class_csv(rows, tmp_path / "t.csv")
    read = list(csv.DictReader(open(path)))
    assert list(read[0]) == ["class", "precision", "recall", "f1", "support"]
    assert [r["class"] for r in read] == ["0", "1", "macro avg", "weighted avg"]
    assert float(read[0]["recall"]) == 0.5 and read[2]["support"] == "3"

    plots = ClassificationPlots(tmp_path / "run")
    plots.start({"monitor": None, "mode": "max"})
    plots.log_validation(0, 1, ValidationSample(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2))
    plots.log_epoch(0, 1, {})
    plots.finish({})
    again = list(csv.DictReader(open(tmp_path / "run" / "plots" / "per_class.csv")))
    assert again == read[:2]  # the same writer, the class rows only


def _run_plots(tmp_path, info: dict, values: list[float]) -> int:
    """The epoch whose validation the plots draw, after epochs with these monitored values."""
    plots = ClassificationPlots(tmp_path)
    plots.start({"monitor": "val/acc", **info})
    for epoch, value in enumerate(values):
        # Epoch e's sample: e + 1 of the three samples right, so the chosen epoch shows in the CSV.
        preds = torch.tensor([0, 1, 2])
        preds[epoch + 1:] = 0
        plots.log_validation(epoch, epoch, ValidationSample(preds, torch.tensor([0, 1, 2]), 3))
        plots.log_epoch(epoch, epoch, {"val/acc": value})
    plots.finish({})
    rows = list(csv.DictReader(open(tmp_path / "plots" / "per_class.csv")))
    return sum(float(r["recall"]) for r in rows) - 1  # epoch e has e + 1 classes recalled


def test_plots_best_epoch_respects_min_delta(tmp_path):
    values = [0.50, 0.505, 0.60]
    assert _run_plots(tmp_path / "a", {"mode": "max"}, values[:2]) == 1
    assert _run_plots(tmp_path / "b", {"mode": "max", "min_delta": 0.01}, values[:2]) == 0
    assert _run_plots(tmp_path / "c", {"mode": "max", "min_delta": 0.01}, values) == 2
    assert _run_plots(tmp_path / "d", {"mode": "min", "min_delta": 0.01}, [0.5, 0.495]) == 0
