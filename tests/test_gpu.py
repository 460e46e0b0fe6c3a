"""CUDA checks of the optimizer step (skipped without a GPU). Synthetic data and no config, so this
file also runs where only torch and torchvision are installed (`pytest --noconftest -m gpu`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as L
from torch.utils.data import DataLoader, TensorDataset

from torchkiln.engine.settings import make_trainer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[1]


def data(n=1000, batch=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g)
    y = (x[:, :10].argmax(1) + (x[:, 10] > 0).long()) % 10
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_bf16_autocast_on_cuda():
    model = mlp()
    seen = []
    model[2].register_forward_hook(lambda m, i, o: seen.append((o.dtype, o.device.type)))
    make_trainer(model, torch.optim.Adam(model.parameters(), 1e-3), device="cuda", precision="bf16", epochs=1,
            progress=False).fit(data())
    assert set(seen) == {(torch.bfloat16, "cuda")}


def test_fp16_inf_gradient_skips_optimizer_and_scheduler_on_cuda():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = L.ExponentialLR(opt, gamma=0.9)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 3 else grad

    model[2].weight.register_hook(poison)
    t = make_trainer(model, opt, scheduler=sched, scheduler_interval="step", device="cuda", precision="fp16",
                epochs=1, progress=False, scaler_options={"init_scale": 1024.0})
    t.fit(data(320))
    assert t.loop.global_step == 10 and t.stepper.skipped == 1
    assert sched.last_epoch == 9
    assert all(int(s["step"]) == 9 for s in opt.state.values())


def test_accumulation_matches_big_batch_on_cuda():
    def train(batch, k):
        model = mlp()
        make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), device="cuda",
                accumulate=k, epochs=1, progress=False).fit(data(1000, batch))
        return model.state_dict()

    big, small = train(32, 1), train(8, 4)
    for k in big:
        torch.testing.assert_close(small[k], big[k], rtol=0, atol=1e-5)


def test_gpu_check_quick_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--arch",
                           "resnet18", "--variants", "trainer-fp16,hand-fp16,trainer-bf16-channels_last"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| trainer-fp16 |" in proc.stdout and "| hand-fp16 |" in proc.stdout


def test_cuda_memory_and_utilization_per_epoch():
    """The per-epoch device numbers on a real GPU: peak memory always, utilization with nvidia-ml-py;
    and an asynchronous checkpoint write (the default off the CPU) lands whole before fit returns."""
    import importlib.util
    import tempfile

    from torchkiln.engine.checkpoint import load_checkpoint
    from torchkiln.loggers.base import Logger

    class Records(Logger):
        def __init__(self):
            self.rows: list[dict] = []

        def log_steps(self, rows):
            pass

        def log_epoch(self, epoch, step, record):
            self.rows.append(dict(record))

    model = mlp()
    records = Records()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(model, torch.optim.Adam(model.parameters(), 1e-3), device="cuda", epochs=2,
                          progress=False, loggers=[records], log_every_n_steps=5, run_dir=run_dir)
        assert trainer.checkpoints.background
        trainer.fit(data())
        assert load_checkpoint(Path(run_dir) / "checkpoints" / "last.ckpt")["loop"]["epoch"] == 2
    last = records.rows[-1]
    assert 0 < last["memory/peak_allocated_mb"] <= last["memory/peak_reserved_mb"]
    if importlib.util.find_spec("pynvml") is not None:
        assert 0 <= last["gpu/utilization_pct"] <= 100
