"""pytorch-template style configs are accepted: translated, validated and trained."""

from __future__ import annotations

import json

import pytest

from torchkiln.config.load import load_checked, load_config
from torchkiln.errors import ConfigError

TEMPLATE = {
    "name": "Mnist_LeNet",
    "n_gpu": 1,
    "arch": {"type": "SmallCNN", "args": {"width": 8}},
    "data_loader": {
        "type": "Digits",
        "args": {"batch_size": 64, "shuffle": True, "validation_split": 0.1, "num_workers": 0},
    },
    "optimizer": {"type": "Adam", "args": {"lr": 0.001, "weight_decay": 0, "amsgrad": True}},
    "loss": "cross_entropy",
    "metrics": ["accuracy", "top_k_acc"],
    "lr_scheduler": {"type": "StepLR", "args": {"step_size": 50, "gamma": 0.1}},
    "trainer": {"epochs": 2, "save_dir": "saved/", "save_period": 1, "verbosity": 2,
                "monitor": "min val_loss", "early_stop": 10, "tensorboard": True},
}


def test_template_config_is_translated(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TEMPLATE))
    cfg = load_checked(path)
    assert cfg.model.type == "SmallCNN" and cfg.model.args == {"width": 8}
    assert cfg.data.dataset.type == "Digits" and cfg.data.val_split == 0.1 and cfg.data.batch_size == 64
    assert cfg.loss.type == "CrossEntropyLoss"
    assert cfg.metrics == ["accuracy", "accuracy@3"]
    assert cfg.scheduler.type == "StepLR"
    assert (cfg.trainer.monitor, cfg.trainer.mode, cfg.trainer.early_stop) == ("val/loss", "min", 10)
    assert cfg.output_dir == "saved/" and cfg.trainer.save_period == 1


def test_template_config_trains(tmp_path, cli):
    tpl = json.loads(json.dumps(TEMPLATE))
    tpl["trainer"]["save_dir"] = str(tmp_path / "saved")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tpl))
    code, _, err = cli("train", "-q", "-c", str(path))
    assert code == 0, err
    run_dir = next((tmp_path / "saved" / "Mnist_LeNet").iterdir())
    assert (run_dir / "checkpoints" / "epoch-002.ckpt").is_file()


def test_template_monitor_must_be_mode_and_metric(tmp_path):
    tpl = {**TEMPLATE, "trainer": {**TEMPLATE["trainer"], "monitor": "val_loss"}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tpl))
    with pytest.raises(ConfigError, match="trainer.monitor: expected 'min val_loss'"):
        load_config(path)
