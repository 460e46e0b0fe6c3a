"""Tabular data: `data.normalize` (fitted on the training split, stored in the run, used by
`kiln test`, regression outputs mapped back) and `kiln data stats` for feature vectors, on
scikit-learn's bundled breast-cancer and diabetes data written as TensorFiles."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import kiln, small_config, write_config
from torchkiln.commands.train import build_trainer
from torchkiln.config.build import build_data
from torchkiln.config.load import resolve
from torchkiln.data.splits import split_dataset
from torchkiln.data.tensorfile import TensorFile
from torchkiln.engine.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def cancer(tmp_path_factory) -> Path:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    path = tmp_path_factory.mktemp("tab") / "cancer.npz"
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
    return path


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory) -> Path:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=False)
    path = tmp_path_factory.mktemp("tab") / "diabetes.npz"
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.float32))
    return path


def _cancer_cfg(tmp_path, npz, **data) -> dict:
    return small_config(tmp_path, data={"dataset": {"type": "TensorFile", "args": {"path": str(npz)}},
                                        "val_split": 0.25, "test_split": 0.2, "batch_size": 32, **data},
                        model={"type": "MLP", "args": {"in_features": 30, "num_classes": 2, "hidden": [16]}},
                        metrics=["accuracy"], optimizer={"type": "Adam", "args": {"lr": 0.003}},
                        trainer={"epochs": 5, "monitor": "val/accuracy", "device": "cpu"},
                        logging={"progress": False, "tensorboard": False, "plots": False})


def _diabetes_cfg(tmp_path, npz, **data) -> dict:
    return small_config(tmp_path, task="regression",
                        data={"dataset": {"type": "TensorFile", "args": {"path": str(npz)}},
                              "val_split": 0.25, "test_split": 0.0, "batch_size": 32, **data},
                        model={"type": "MLP", "args": {"in_features": 10, "num_classes": 1, "hidden": [16]}},
                        metrics=["mae", "rmse"], optimizer={"type": "Adam", "args": {"lr": 0.003}},
                        trainer={"epochs": 15, "monitor": "val/mae", "device": "cpu"},
                        logging={"progress": False, "tensorboard": False, "plots": False})


def _best(run_root: Path, key: str, mode: str = "max") -> float:
    rows = list(csv.DictReader(next(run_root.glob("*/*/metrics.csv")).open()))
    values = [float(r[key]) for r in rows]
    return max(values) if mode == "max" else min(values)


def test_normalize_is_fitted_on_the_training_split_only(tmp_path, cancer):
    cfg = resolve(_cancer_cfg(tmp_path, cancer, normalize=True))
    data = build_data(cfg)
    train, _, _ = split_dataset(TensorFile(str(cancer)), 0.25, 0.2, seed=cfg.seed)
    x = np.load(cancer)["x"].astype(np.float64)
    mean, std = data.normalization.features
    np.testing.assert_allclose(mean.numpy(), x[train.indices].mean(0), rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), x[train.indices].std(0), rtol=1e-5)
    assert not np.allclose(mean.numpy(), x.mean(0), rtol=1e-5)  # not the whole file's
    assert data.normalization.targets is None  # classes are never standardized
    batch = torch.stack([data.train[i][0] for i in range(len(data.train))])
    np.testing.assert_allclose(batch.mean(0).numpy(), 0.0, atol=1e-4)
    val_x, val_y = data.val[0]
    np.testing.assert_allclose(val_x.numpy(), (x[data.val.indices[0]] - mean.numpy()) / std.numpy(), rtol=1e-4,
                               atol=1e-5)
    assert val_y.dtype == torch.int64


def test_normalize_raises_breast_cancer_accuracy_and_kiln_test_uses_the_stored_statistics(tmp_path, cancer):
    acc = {}
    for setting in ("true", "false"):
        cfg = write_config(tmp_path, _cancer_cfg(tmp_path / setting, cancer), f"{setting}.yaml")
        kiln("train", "-c", str(cfg), f"data.normalize={setting}", check=True)
        acc[setting] = _best(tmp_path / setting / "runs", "val/accuracy")
    assert acc["true"] > acc["false"] + 0.02, acc
    run = next((tmp_path / "true" / "runs").glob("*/*"))
    stored = json.loads((run / "normalization.json").read_text())
    assert len(stored["features"]["mean"]) == 30 and stored["targets"] is None
    ckpt = load_checkpoint(run / "checkpoints" / "best.ckpt")
    assert ckpt["config"]["normalization"] == stored  # the checkpoint carries them too
    out = kiln("test", str(run), check=True)
    tested = json.loads((run / "test_metrics.json").read_text())
    assert tested["test/accuracy"] > 0.9, out.stdout
    # A checkpoint without statistics cannot be tested with normalization: one line, exit 2.
    plain = next((tmp_path / "false" / "runs").glob("*/*"))
    proc = kiln("test", str(plain), "data.normalize=true")
    assert proc.returncode == 2
    assert "holds no data.normalize statistics" in proc.stderr.strip().splitlines()[-1]


def test_regression_targets_are_standardized_for_the_loss_and_mapped_back(tmp_path, diabetes):
    cfg = resolve(_diabetes_cfg(tmp_path, diabetes, normalize=True))
    trainer, loaders = build_trainer(cfg, None, progress=False)
    mean, std = trainer.task.target_scale
    y = np.load(diabetes)["y"].astype(np.float64)
    train_idx = loaders["train"].dataset.indices
    np.testing.assert_allclose([float(mean), float(std)], [y[train_idx].mean(), y[train_idx].std()], rtol=1e-5)
    trainer.fit(loaders["train"], loaders["val"])
    val = trainer.evaluate(loaders["val"], "val")
    pred = trainer.predict(loaders["val"]).reshape(-1).numpy().astype(np.float64)
    target = y[loaders["val"].dataset.indices]
    assert pred.mean() > 50  # predictions in the data's units (targets 25-346)
    np.testing.assert_allclose(val["val/mae"], np.abs(pred - target).mean(), rtol=1e-4)
    np.testing.assert_allclose(val["val/loss"], (((pred - target) / float(std)) ** 2).mean(), rtol=1e-3)


def test_normalize_lowers_diabetes_mae(tmp_path, diabetes):
    mae = {}
    for setting in ("true", "false"):
        cfg = resolve(_diabetes_cfg(tmp_path, diabetes, normalize=setting == "true"))
        trainer, loaders = build_trainer(cfg, None, progress=False)
        trainer.fit(loaders["train"], loaders["val"])
        mae[setting] = trainer.evaluate(loaders["val"], "val")["val/mae"]
    assert mae["true"] < mae["false"] - 3, mae


def test_data_stats_describes_tabular_features_and_targets(tmp_path, cancer, diabetes):
    for npz, cfg_of in ((cancer, _cancer_cfg), (diabetes, _diabetes_cfg)):
        raw = cfg_of(tmp_path, npz, normalize=True)  # stats describe the stored values all the same
        cfg = write_config(tmp_path, raw, "stats.yaml")
        out = tmp_path / f"stats-{npz.stem}"
        proc = kiln("data", "stats", "-c", str(cfg), "-o", str(out), check=True)
        stats = json.loads((out / "stats.json").read_text())["tabular"]
        train, _, _ = split_dataset(TensorFile(str(npz)), raw["data"]["val_split"], raw["data"]["test_split"],
                                    seed=0)
        arrays = np.load(npz)
        x, y = arrays["x"][train.indices].astype(np.float64), arrays["y"][train.indices]
        f = stats["features"]
        assert f["count"] == x.shape[1]
        for key, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
            np.testing.assert_allclose(f[key], fn(x, axis=0), rtol=1e-4, atol=1e-6)
        assert f"features           {x.shape[1]}" in proc.stdout
        assert "data.normalize: true standardizes them" in proc.stdout  # scales differ widely in both
        if npz is diabetes:
            assert stats["target"]["kind"] == "real"
            np.testing.assert_allclose(stats["target"]["median"], np.median(y), rtol=1e-5)
            assert "target             mean" in proc.stdout
        else:
            assert stats["target"]["counts"] == {str(v): int((y == v).sum()) for v in (0, 1)}


def test_stored_statistics_replace_fitting(tmp_path, cancer):
    """kiln test and resume pass the checkpoint's statistics: they are applied as stored, not refitted."""
    cfg = resolve(_cancer_cfg(tmp_path, cancer, normalize=True))
    stored = {"features": {"mean": [1.0] * 30, "std": [2.0] * 30}, "targets": None}
    data = build_data(cfg, normalization=stored)
    raw = np.load(cancer)["x"][data.train.indices[0]]
    np.testing.assert_allclose(data.train[0][0].numpy(), (raw - 1.0) / 2.0, rtol=1e-6)
    assert data.normalization.to_dict() == stored
