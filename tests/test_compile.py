"""torch.compile: clean checkpoint keys, loads across compile on/off, options passed, recompiles logged."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import Subset

from conftest import kiln, small_config, write_config
from torchkiln.data.digits import Digits
from torchkiln.data.loaders import make_loader
from torchkiln.engine.checkpoint import load_checkpoint
from torchkiln.engine.settings import make_trainer as trainer_from_settings
from torchkiln.errors import ConfigError
from torchkiln.models.small import MLP


@pytest.fixture(scope="module")
def data():
    ds = Digits()
    return make_loader(Subset(ds, range(512)), 64, train=True, seed=0), \
        make_loader(Subset(ds, range(1500, 1797)), 128, train=False, seed=0)


@pytest.fixture
def dynamo_limit():
    import torch._dynamo

    before = torch._dynamo.config.cache_size_limit
    yield
    torch._dynamo.config.cache_size_limit = before
    torch._dynamo.reset()


def make_trainer(run_dir, epochs, compile, **kw):
    torch.manual_seed(0)
    model = MLP(num_classes=10, hidden=[16])
    return trainer_from_settings(model, torch.optim.Adam(model.parameters(), 1e-2), device="cpu", epochs=epochs,
                   progress=False, run_dir=run_dir, compile=compile, **kw)


def test_compiled_run_checkpoints_have_clean_keys_and_load_either_way(data, tmp_path, caplog, dynamo_limit):
    import torch._dynamo

    eager = {"backend": "eager"}  # dynamo traces the model; no C++ build, so this stays fast
    with caplog.at_level(logging.INFO, logger="torchkiln"):
        t = make_trainer(tmp_path / "a", 1, True, compile_options=eager, cache_size_limit=17)
        summary = t.fit(*data)
    assert isinstance(t.model, torch._dynamo.eval_frame.OptimizedModule)
    assert torch._dynamo.config.cache_size_limit == 17
    assert summary["compile"]["graphs"] >= 1
    assert "torch.compile: " in caplog.text and "recompilations (dynamo cache_size_limit 17)" in caplog.text
    saved = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert not [k for k in saved["model"] if "_orig_mod" in k]
    assert set(saved["model"]) == set(t.raw_model.state_dict())

    # compile on -> off: resume and keep training without compile
    off = make_trainer(tmp_path / "a", 2, False)
    off.fit(*data, resume=tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert off.loop.epoch == 2 and off.compile_report is None

    # compile off -> on
    on = make_trainer(tmp_path / "a", 3, True, compile_options=eager)
    on.fit(*data, resume=tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert on.loop.epoch == 3
    assert not [k for k in load_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")["model"]
                if "_orig_mod" in k]

    # weights saved from a compiled module by other code (with `_orig_mod.` keys) load too
    other = torch.compile(MLP(num_classes=10, hidden=[16]), backend="eager")
    assert all(k.startswith("_orig_mod.") for k in other.state_dict())
    on.load_weights(other.state_dict())
    torch.testing.assert_close(on.raw_model.head.weight, other._orig_mod.head.weight)


def test_compile_options_are_passed_through(data, tmp_path):
    t = make_trainer(None, 1, True, compile_options={"backend": "eager", "not_an_option": 1})
    with pytest.raises(ConfigError, match="compile_options"):
        t.fit(*data)


@pytest.mark.slow
def test_cli_compile_with_inductor(tmp_path, dynamo_limit):
    """The real thing: inductor on CPU from a config, then resumed without compile."""
    cfg = small_config(tmp_path, trainer={"epochs": 1, "monitor": "val/accuracy", "compile": True,
                                          "cache_size_limit": 512}, logging={"plots": False})
    kiln("train", "-c", str(write_config(tmp_path, cfg)), check=True, timeout=600)
    run = next((tmp_path / "runs" / "t").iterdir())
    log = (run / "train.log").read_text()
    assert "torch.compile: " in log and "(dynamo cache_size_limit 512)" in log
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["model"] and not [k for k in state["model"] if "_orig_mod" in k]
    kiln("train", "--resume", str(run), "trainer.compile=false", "trainer.epochs=2", check=True)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["loop"]["epoch"] == 2
