"""Metric names through the real `kiln`, in a fresh process, as a user's config gives them."""

from __future__ import annotations

import json
import re

import numpy as np

from conftest import ROOT, kiln, small_config, write_config
from torchkiln.metrics import KINDS, names_for


def test_common_names_train_a_binary_model(tmp_path):
    """`roc_auc` and binary `f1` / `precision` / `recall` from a config, on a two-class data set."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "binary.npz", x=x, y=y)
    metrics = ["roc_auc", "f1", "precision", "recall", "balanced_accuracy"]
    cfg = small_config(tmp_path, metrics=metrics, data={"dataset": {"type": "TensorFile",
                                                                     "args": {"path": str(tmp_path / "binary.npz")}}},
                       model={"type": "MLP", "args": {"in_features": 6, "num_classes": 2, "hidden": [16]}},
                       trainer={"epochs": 2, "monitor": "val/roc_auc"},
                       logging={"progress": False, "tensorboard": False, "plots": False})
    kiln("train", "-c", str(write_config(tmp_path, cfg)), "-q", check=True)
    summary = json.loads(next((tmp_path / "runs" / "t").glob("*/summary.json")).read_text())
    for name in metrics:
        assert 0.5 < summary["final"][f"val/{name}"] <= 1.0, (name, summary["final"])


def test_unknown_metric_is_one_line_with_the_valid_names(tmp_path):
    cfg = small_config(tmp_path, metrics=["accuracy", "rocauc"])
    proc = kiln("train", "-c", str(write_config(tmp_path, cfg)), "-q")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "metrics.1: unknown metric 'rocauc'; did you mean 'roc_auc'?" in lines[0]
    assert ", ".join(names_for("multiclass")) in lines[0]
    # binary names on a ten-class model: the error says which names fit
    cfg = small_config(tmp_path, metrics=["f1"])
    proc = kiln("train", "-c", str(write_config(tmp_path, cfg)), "-q")
    assert proc.returncode == 2 and "this model has 10 (use f1_macro, f1_micro or f1_weighted)" in proc.stderr


def test_readme_lists_every_metric_name_by_task_kind():
    """The README's table of metric names is the registry's, kind by kind."""
    text = (ROOT / "README.md").read_text()
    table = {}
    for kind in KINDS:
        row = re.search(rf"^\| {kind} \| (.+) \|$", text, re.M)
        assert row, f"README: no row for {kind} in the metric names table"
        table[kind] = sorted(re.findall(r"`([^`]+)`", row.group(1)))
    assert table == {kind: names_for(kind) for kind in KINDS}
