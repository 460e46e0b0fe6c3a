"""Train better: EMA of the weights, SWA, mixup/CutMix and the first-epoch "does training work"
checks, each on short real trainings on digits. The EMA run is killed with -9 mid-epoch and
resumed: it must end bit for bit like the run that never stopped (mixup's draws included)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import ROOT, kiln, small_config, write_config
from torchkiln import make_trainer
from torchkiln.callbacks.ema import EMA
from torchkiln.commands.export import export
from torchkiln.commands.train import check, train
from torchkiln.config.load import resolve
from torchkiln.data.mixup import BatchMixer
from torchkiln.engine.callbacks import StepInfo
from torchkiln.engine.checkpoint import load_checkpoint, model_weights, weights_kind
from torchkiln.errors import ConfigError, TrainingError
from torchkiln.tasks.base import ClassificationTask

FAULT_ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
BATCHES = 10  # 1257 training samples in batches of 128


# ------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def test_ema_equals_the_closed_form_on_a_known_sequence():
    for warmup in (False, True):
        model, ema = Tiny(), EMA(decay=0.9, warmup=warmup, every_n_steps=2)
        ema.weights = {k: v.clone() for k, v in model.state_dict().items()}
        seq = [torch.tensor([1.0, -2.0, 0.5]) * (k + 1) for k in range(6)]
        for step, w in enumerate(seq, start=1):
            model.w.data.copy_(w)
            model.count.fill_(step)
            ema.on_step_end(type("T", (), {"raw_model": model})(),
                            StepInfo(0, step, step - 1, torch.tensor(0.0), None, [0.1], step != 4, False))
        # updates after steps 2 and 6 (step 4 was skipped by the fp16 scaler): closed form in float64
        used = [seq[1].double(), seq[5].double()]
        d = [ema.decay_at(1), ema.decay_at(2)]
        want = d[1] * (d[0] * 0.0 + (1 - d[0]) * used[0]) + (1 - d[1]) * used[1]
        assert ema.updates == 2
        assert torch.allclose(ema.weights["w"].double(), want, rtol=1e-6, atol=1e-7)
        assert int(ema.weights["count"]) == 6  # integer buffers are copied
    assert EMA(0.999, warmup=True).decay_at(1) == pytest.approx(2 / 11)


def ema_config(root):
    """SmallCNN with dropout and BatchNorm, EMA and mixup/CutMix: every RNG draw must resume."""
    return small_config(
        root,
        data={"batch_size": 128, "mixup": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "prob": 0.7}},
        model={"type": "kiln_faults:FaultyCNN", "args": {"num_classes": 10, "width": 8, "dropout": 0.3}},
        trainer={"epochs": 4, "monitor": "val/accuracy", "checkpoint_every_steps": 4,
                 "async_checkpoints": False, "ema": {"decay": 0.95}},
        logging={"progress": False, "plots": False, "tensorboard": False},
    )


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """(reference run, killed-and-resumed run): 4 epochs straight, and 2 + kill -9 mid-epoch 3 +
    resume + the rest."""
    ref_root, root = tmp_path_factory.mktemp("ema-ref"), tmp_path_factory.mktemp("ema-kill")
    kiln("train", "-c", str(write_config(ref_root, ema_config(ref_root))), env=FAULT_ENV, check=True)
    cfg = write_config(root, ema_config(root))
    killed = kiln("train", "-c", str(cfg), env={**FAULT_ENV, "KILN_FAULT_KILL_AT": str(2 * BATCHES + 7)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = kiln("train", "-c", str(cfg), "--resume", "auto", env=FAULT_ENV, check=True)
    assert "resumed at epoch 3, step 24 (batch 4 of the epoch)" in resumed.stderr
    (ref,) = (ref_root / "runs" / "t").iterdir()
    (run,) = (root / "runs" / "t").iterdir()
    return ref, run


def test_ema_and_mixup_resume_bitwise_after_kill9(ema_runs):
    ref, run = ema_runs
    a, b = (load_checkpoint(r / "checkpoints" / "last.ckpt") for r in (ref, run))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"weights differ: {k}"
    assert a["averaged"]["updates"] == b["averaged"]["updates"] == 4 * BATCHES
    for k in a["averaged"]["weights"]:
        assert torch.equal(a["averaged"]["weights"][k], b["averaged"]["weights"][k]), f"EMA weights differ: {k}"
    assert a["loop"]["history"] == b["loop"]["history"]


def test_ema_validates_saves_and_exports_the_ema_weights(ema_runs, tmp_path):
    ref, _ = ema_runs
    log_text = (ref / "train.log").read_text()
    assert "validation, best.ckpt and inference use the EMA weights" in log_text
    best = load_checkpoint(ref / "checkpoints" / "best.ckpt")
    assert weights_kind(best) == "ema"
    ema_w, trained = model_weights(best), model_weights(best, averaged=False)
    assert ema_w is best["averaged"]["weights"] and trained is best["model"]
    assert any(not torch.equal(ema_w[k], trained[k]) for k in trained)
    # the same tensors under both keys of the checkpoint: one copy on disk
    assert best["callbacks"]["EMA"]["weights"]["features.0.weight"].data_ptr() == ema_w["features.0.weight"].data_ptr()
    weights_path, info_path = export(ref, out_dir=tmp_path / "export")
    from safetensors.torch import load_file

    exported = load_file(str(weights_path))
    assert all(torch.equal(exported[k], ema_w[k].cpu()) for k in exported)
    assert json.loads(info_path.read_text())["weights"] == "ema"
    import torchkiln  # kiln predict's model: the EMA weights too

    predictor = torchkiln.load(ref, checkpoint="best", device="cpu")
    assert all(torch.equal(v.cpu(), ema_w[k].cpu()) for k, v in predictor.model.state_dict().items())
    # mixup's soft targets: train accuracy is on the dominant label, and is logged
    history = best["loop"]["history"]
    assert all(0.0 <= h["train/accuracy"] <= 1.0 for h in history) and history[-1]["val/accuracy"] > 0.5


# ------------------------------------------------------------------------------------------
# SWA
# ------------------------------------------------------------------------------------------
def test_swa_averages_the_last_epochs_and_recomputes_batchnorm(tmp_path):
    cfg = small_config(tmp_path, data={"batch_size": 128, "dataset": {"type": "Digits", "args": {"classes": [0, 1, 2, 3]}}},
                       model={"type": "SmallCNN", "args": {"num_classes": 4, "width": 8}},
                       metrics=["accuracy"],
                       trainer={"epochs": 2, "save_period": 1, "swa": {"start_epoch": 1, "lr": 0.002,
                                                                       "anneal_epochs": 1}},
                       logging={"progress": False, "plots": False, "tensorboard": False})
    run, summary = train(resolve(cfg, "t"), progress=False)
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert weights_kind(last) == "swa" and last["averaged"]["epochs_averaged"] == 2
    assert "averaged" not in load_checkpoint(run / "checkpoints" / "epoch-001.ckpt")
    w1 = load_checkpoint(run / "checkpoints" / "epoch-001.ckpt")["model"]
    avg, w2 = last["averaged"]["weights"], last["model"]
    assert torch.allclose(avg["features.0.weight"], (w1["features.0.weight"] + w2["features.0.weight"]) / 2, atol=1e-6)
    # update_bn: the average's BatchNorm statistics are its own, not the training model's
    bn = [k for k in avg if k.endswith("running_mean")]
    assert bn and all(not torch.equal(avg[k], w2[k]) for k in bn)
    lrs = [h["lr/group0"] for h in last["loop"]["history"]]
    assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.002)  # SWALR annealed to swa.lr
    assert "SWA: 2 epoch(s) averaged, BatchNorm statistics recomputed" in (run / "train.log").read_text()


# ------------------------------------------------------------------------------------------
# mixup / CutMix
# ------------------------------------------------------------------------------------------
def test_mixer_gives_soft_targets_and_metrics_use_the_dominant_label():
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    mixed, soft = BatchMixer(10, mixup_alpha=0.4, cutmix_alpha=1.0)(x, y)
    assert soft.shape == (16, 10) and torch.allclose(soft.sum(1), torch.ones(16))
    _, plain = BatchMixer(10, mixup_alpha=0.4, prob=0.0)(x, y)
    assert torch.equal(plain.argmax(1), y) and torch.equal(plain.sum(1), torch.ones(16))
    from torchmetrics.classification import MulticlassAccuracy

    logits = torch.randn(16, 10)
    a, b = MulticlassAccuracy(10, average="micro"), MulticlassAccuracy(10, average="micro")
    ClassificationTask().update_metrics(a, logits, soft)
    ClassificationTask().update_metrics(b, logits, soft.argmax(1))
    assert a.compute() == b.compute()


def test_mixup_refuses_flat_features_before_the_run(tmp_path):
    cfg = small_config(tmp_path, data={"dataset": {"type": "Digits", "args": {"flatten": True}},
                                       "mixup": {"mixup_alpha": 0.2}})
    with pytest.raises(ConfigError, match="data.mixup: the training batches cannot be mixed"):
        check(resolve(cfg, "t"))
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# "does training work" checks
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    ds = TensorDataset(torch.tensor(x[:512], dtype=torch.float32) / 16, torch.tensor(y[:512]))
    return DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.spare = nn.Linear(64, 10), nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x)


class NanGrad(nn.Module):
    """A finite loss whose gradient is NaN: d/dw sqrt(w - w) at 0."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x) + (self.fc.weight.sum() - self.fc.weight.sum()).sqrt()


def _fit(model, loader, lr=0.05, checks="warn", **settings):
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=lr), epochs=1, progress=False,
                           checks=checks, **settings)
    return trainer.fit(loader)["checks"]


def test_checks_pass_on_a_working_run_and_name_what_is_wrong(digits, caplog):
    torch.manual_seed(0)
    good = _fit(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), digits)
    assert good["findings"] == [] and len(good["passed"]) == 4
    assert "the optimizer holds every trainable parameter" in good["passed"]
    found = _fit(Unused(), digits)["findings"]
    assert len(found) == 1 and "spare.weight, spare.bias" in found[0] and "unused parameters" in found[0]
    assert "check: 2 trainable parameter(s) received no gradient" in caplog.text
    assert "no trainable parameter changed" in _fit(nn.Linear(64, 10), digits, lr=0.0)["findings"][0]
    assert "non-finite gradients" in _fit(NanGrad(), digits, on_nonfinite="skip_batch")["findings"][0]
    with pytest.raises(TrainingError, match="trainer.checks: strict: 2 trainable parameter"):
        _fit(Unused(), digits, checks="strict")
    partial = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))  # the optimizer holds the head only
    trainer = make_trainer(partial, torch.optim.SGD(partial[2].parameters(), lr=0.05), epochs=1, progress=False)
    found = trainer.fit(digits)["checks"]["findings"]
    assert found == ["2 trainable parameter(s) are not in the optimizer: 0.weight, 0.bias (they get gradients"
                     " but never a step; add them to the optimizer, or freeze them with requires_grad_(False))"]
    trainer = make_trainer(Unused(), torch.optim.SGD(Unused().parameters(), lr=0.1), epochs=1, progress=False,
                           checks="off")
    assert "checks" not in trainer.fit(digits)
