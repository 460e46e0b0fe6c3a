"""Real short trainings on digits for every task kind, and the `kiln test` report files."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import kiln, small_config, write_config
from torchkiln.commands import train as run
from torchkiln.config.load import resolve

FAST = {"progress": False, "tensorboard": False, "plots": False}


def _train(tmp_path, **sections):
    cfg = small_config(tmp_path, logging=FAST, **sections)
    cfg["trainer"].pop("monitor", None)  # the task's default
    return run.train(resolve(cfg), progress=False)


@pytest.mark.slow
def test_classification_report_files_and_per_class_logging(tmp_path):
    cfg = small_config(tmp_path, metrics=["f1_macro", "accuracy", "f1_per_class", "confusion_matrix"],
                       logging={"progress": False, "tensorboard": False})
    cfg["trainer"].pop("monitor")
    out = kiln("train", "-c", str(write_config(tmp_path, cfg)), "-q", check=True)
    assert out.returncode == 0
    run_dir = next((tmp_path / "runs" / "t").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["monitor"] == "val/f1_macro"  # the first metric listed
    assert summary["final"]["val/f1_per_class/9"] >= 0  # per-class vectors logged as scalars
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "val/f1_per_class/0" in header and "confusion_matrix" not in header

    test = kiln("test", str(run_dir), check=True)
    assert "precision" in test.stdout and "support" in test.stdout and "macro avg" in test.stdout
    results = json.loads((run_dir / "test_metrics.json").read_text())
    rows = list(csv.DictReader(open(run_dir / "test_per_class.csv")))
    assert [r["class"] for r in rows[:10]] == [str(i) for i in range(10)]
    assert sum(int(r["support"]) for r in rows[:10]) == results["samples"]
    macro = next(r for r in rows if r["class"] == "macro avg")
    assert float(macro["f1"]) == pytest.approx(results["test/f1_macro"], abs=1e-5)
    for i, r in enumerate(rows[:10]):
        assert float(r["f1"]) == pytest.approx(results[f"test/f1_per_class/{i}"], abs=1e-5)
    cm = list(csv.reader(open(run_dir / "test_confusion_matrix.csv")))
    counts = [[int(v) for v in row[1:]] for row in cm[1:]]
    assert sum(map(sum, counts)) == results["samples"]
    assert sum(counts[i][i] for i in range(10)) / results["samples"] == pytest.approx(results["test/accuracy"])
    png = run_dir / "plots" / "test_confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multilabel_learns_parity_and_ge5(tmp_path):
    _, summary = _train(tmp_path, task="multilabel", data={"dataset": {"type": "DigitsMultiLabel"}},
                        model={"type": "MLP", "args": {"hidden": [32]}}, metrics=[], trainer={"epochs": 3})
    assert summary["monitor"] == "val/f1_macro"
    assert summary["final"]["val/f1_macro"] > 0.8
    assert summary["final"]["val/exact_match"] > 0.65


def test_regression_predicts_the_digit(tmp_path):
    _, summary = _train(tmp_path, task="regression", data={"dataset": {"type": "DigitsRegression"}},
                        model={"type": "MLP", "args": {"hidden": [64]}}, metrics=[],
                        loss={"type": "HuberLoss"}, trainer={"epochs": 6})
    assert summary["monitor"] == "val/rmse" and summary["mode"] == "min"
    assert summary["final"]["val/r2"] > 0.5


def test_ranking_improves_ndcg_over_the_untrained_model(tmp_path):
    cfg = small_config(tmp_path, task="ranking", logging=FAST, metrics=["ndcg@5", "map", "mrr", "hit_rate@3"],
                       data={"dataset": {"type": "DigitsRanking"}, "stratify": False},
                       model={"type": "MLP", "args": {"hidden": [32]}}, trainer={"epochs": 5})
    cfg["trainer"].pop("monitor")
    trainer, loaders = run.build_trainer(resolve(cfg), None, progress=False)
    before = trainer.evaluate(loaders["val"])
    summary = trainer.fit(loaders["train"], loaders["val"])
    after = summary["final"]
    assert summary["monitor"] == "val/ndcg@5"
    assert after["val/ndcg@5"] > before["val/ndcg@5"] + 0.1, (before, after)
    assert after["val/mrr"] > before["val/mrr"]


@pytest.mark.slow
def test_multihead_learns_each_head_and_combined_comes_from_the_heads(tmp_path):
    heads = {"mod3": 3, "parity": {"classes": 2, "loss": {"type": "FocalLoss", "args": {"gamma": 2}}},
             "quarter": {"classes": 3, "weight": 2.0, "loss": {"type": "CrossEntropyLoss",
                                                                "args": {"weight": "balanced"}}}}
    cfg = small_config(tmp_path, task={"type": "multihead", "args": {"heads": heads}}, logging=FAST,
                       data={"dataset": {"type": "DigitsMultiHead"}}, metrics=["accuracy", "f1_macro"],
                       model={"type": "MLP", "args": {"hidden": [64]}}, trainer={"epochs": 5})
    cfg["trainer"].pop("monitor")
    trainer, loaders = run.build_trainer(resolve(cfg), None, progress=False)
    assert trainer.raw_model.head.out_features == 8  # 3 + 2 + 3 from the task
    quarter_w = trainer.loss_fn.losses["quarter"].weight  # 'balanced' from the training labels
    labels = torch.cat([b[1][:, 2] for b in loaders["train"]])
    counts = torch.bincount(labels, minlength=3).float()
    torch.testing.assert_close(quarter_w, len(labels) / (3 * counts))
    summary = trainer.fit(loaders["train"], loaders["val"])
    final = summary["final"]
    assert summary["monitor"] == "val/combined/accuracy"
    for head in ("mod3", "parity", "quarter"):
        assert final[f"val/{head}/accuracy"] > 0.8, head
    # The combined metric is computed from the heads: mod3*6 + parity*3 + quarter.
    outs, tgts = [], []
    trainer.model.eval()
    with torch.no_grad():
        for x, y in loaders["val"]:
            outs.append(trainer.model(x))
            tgts.append(y)
    out, y = torch.cat(outs), torch.cat(tgts)
    m3, par, qu = out.split([3, 2, 3], dim=1)
    pred = m3.argmax(1) * 6 + par.argmax(1) * 3 + qu.argmax(1)
    truth = y[:, 0] * 6 + y[:, 1] * 3 + y[:, 2]
    assert final["val/combined/accuracy"] == pytest.approx((pred == truth).float().mean().item(), abs=1e-6)
    both = ((m3.argmax(1) == y[:, 0]) & (par.argmax(1) == y[:, 1]) & (qu.argmax(1) == y[:, 2])).float().mean()
    assert final["val/combined/accuracy"] == pytest.approx(both.item(), abs=1e-6)


def test_task_config_errors_are_one_line(tmp_path, capsys):
    from torchkiln.cli import main

    cfg = small_config(tmp_path, task={"type": "multihead", "args": {"heads": {"a": {"clases": 3}}}})
    assert main(["train", "-c", str(write_config(tmp_path, cfg)), "-q"]) == 2
    assert "task.args.heads.a.clases: unknown key; did you mean 'classes'?" in capsys.readouterr().err
    cfg = small_config(tmp_path, task="regression", metrics=["accuracy"], logging=FAST)
    assert main(["train", "-c", str(write_config(tmp_path, cfg)), "-q"]) == 2
    assert "'accuracy' does not apply to a regression task" in capsys.readouterr().err


def test_metric_for_another_task_fails_at_config_check_before_data(tmp_path, monkeypatch):
    """`metrics: [mrr]` on a classification config is refused when the config is checked, naming
    the file, before any data is read."""
    from torchkiln.config import build as build_module
    from torchkiln.config.load import load_checked
    from torchkiln.errors import ConfigError

    def no_data(*args, **kwargs):
        raise AssertionError("data was built before the config was checked")

    monkeypatch.setattr(build_module, "build_data", no_data)
    path = write_config(tmp_path, small_config(tmp_path, metrics=["accuracy", "mrr"]))
    with pytest.raises(ConfigError, match=r"metrics: 'mrr' does not apply to a multiclass task; it is for ranking"):
        load_checked(path)
    # top-k metrics are judged with the real class count later, not against the stand-in
    load_checked(write_config(tmp_path, small_config(tmp_path, metrics=["top5_accuracy"])))
