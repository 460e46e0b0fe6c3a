"""The fast in-memory path gives the DataLoader path's batches and the same trained weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import small_config
from torchkiln.commands.train import build_trainer
from torchkiln.config.build import build_data, build_loaders
from torchkiln.config.load import resolve
from torchkiln.data.loaders import FastLoader, set_loader_epoch
from torchkiln.errors import ConfigError


def _cfg(tmp_path, fast: str | bool, **data):
    raw = small_config(tmp_path, data={"fast_path": fast, "batch_size": 50, **data},
                       trainer={"epochs": 2, "monitor": "val/accuracy", "device": "cpu"})
    return resolve(raw, "test")


def _epochs(loader, epochs=(0, 1), skip=0):
    out = []
    for e in epochs:
        set_loader_epoch(loader, e, skip=skip)
        out.append([[t.clone() for t in b] for b in loader])
    return out


def _same(a, b):
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert len(ea) == len(eb) and len(ea) > 0
        for ba, bb in zip(ea, eb):
            assert len(ba) == len(bb)
            for ta, tb in zip(ba, bb):
                assert ta.dtype == tb.dtype and torch.equal(ta, tb)


def test_fast_path_is_chosen_automatically_and_yields_the_same_batches(tmp_path):
    for extra in ({}, {"sampler": "balanced", "drop_last": True}):
        fast_cfg, slow_cfg = _cfg(tmp_path, "auto", **extra), _cfg(tmp_path, False, **extra)
        fast = build_loaders(fast_cfg, build_data(fast_cfg))
        slow = build_loaders(slow_cfg, build_data(slow_cfg))
        assert all(isinstance(v, FastLoader) for v in fast.values())
        assert all(isinstance(v, DataLoader) for v in slow.values())
        for split in ("train", "val", "test"):
            assert len(fast[split]) == len(slow[split])
            _same(_epochs(fast[split]), _epochs(slow[split]))
        _same(_epochs(fast["train"], (1,), skip=3), _epochs(slow["train"], (1,), skip=3))
        assert len(_epochs(fast["train"], (1,), skip=3)[0]) == len(fast["train"]) - 3


def test_transforms_or_a_collate_turn_the_fast_path_off(tmp_path):
    cfg = _cfg(tmp_path, "auto", transforms={"train": [{"type": "RandomHorizontalFlip"}]})
    loaders = build_loaders(cfg, build_data(cfg))
    assert isinstance(loaders["train"], DataLoader) and isinstance(loaders["val"], FastLoader)
    cfg = _cfg(tmp_path, "auto", collate="default")
    assert isinstance(build_loaders(cfg, build_data(cfg))["train"], DataLoader)


def _train(cfg, run_dir=None, resume=None):
    trainer, loaders = build_trainer(cfg, run_dir, progress=False)
    trainer.fit(loaders["train"], loaders.get("val"), resume=resume)
    return trainer, loaders


def test_fast_path_and_dataloader_path_train_the_same_weights(tmp_path):
    fast, fl = _train(_cfg(tmp_path, "auto"))
    slow, sl = _train(_cfg(tmp_path, False))
    assert isinstance(fl["train"], FastLoader) and isinstance(sl["train"], DataLoader)
    a, b = fast.raw_model.state_dict(), slow.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fast.loop.history == slow.loop.history


def test_fast_path_resumes_mid_epoch_to_the_same_weights(tmp_path):
    cfg = _cfg(tmp_path, "auto", sampler="balanced")
    cfg.trainer.checkpoint_every_steps = 7
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    full, _ = _train(cfg, run_dir)
    ckpt = run_dir / "checkpoints" / "step-000007.ckpt"  # mid-epoch 1 (26 batches an epoch)
    assert ckpt.is_file()
    resumed, _ = _train(cfg, None, resume=ckpt)
    a, b = full.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensor_file_takes_the_fast_path(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(200, 8)).astype(np.float32), y=np.arange(200) % 4)
    raw = small_config(tmp_path, data={"dataset": {"type": "TensorFile", "args": {"path": str(tmp_path / "d.npz")}},
                                       "batch_size": 32},
                       model={"type": "MLP", "args": {"in_features": 8, "hidden": [16]}})
    cfg = resolve(raw, "test")
    data = build_data(cfg)
    assert data.num_classes == 4
    loaders = build_loaders(cfg, data)
    assert isinstance(loaders["train"], FastLoader)
    x, y = next(iter(loaders["train"]))
    assert x.shape == (32, 8) and y.dtype == torch.int64
    trainer, _ = _train(cfg)
    assert trainer.loop.epoch == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_on_cuda_matches_the_dataloader_path(tmp_path):
    fast_cfg, slow_cfg = _cfg(tmp_path, "auto"), _cfg(tmp_path, False)
    fast_cfg.trainer.device = slow_cfg.trainer.device = "cuda"
    fast = build_loaders(fast_cfg, build_data(fast_cfg))
    slow = build_loaders(slow_cfg, build_data(slow_cfg))
    assert fast["train"].tensors[0].device.type == "cuda"
    a = _epochs(fast["train"])
    b = [[[t.cuda() for t in batch] for batch in epoch] for epoch in _epochs(slow["train"])]
    _same(a, b)
    ft, _ = _train(fast_cfg)
    st, _ = _train(slow_cfg)
    x, y = ft.raw_model.state_dict(), st.raw_model.state_dict()
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_fast_path_true_without_tensor_data_is_a_config_error(tmp_path):
    cfg = _cfg(tmp_path, True, transforms={"train": [{"type": "RandomHorizontalFlip"}]})
    with pytest.raises(ConfigError, match="data.fast_path: true needs an in-memory tensor dataset"):
        build_loaders(cfg, build_data(cfg))
