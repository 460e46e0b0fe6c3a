"""One optimizer step done right: unscale before clip, accumulation, autocast, skipped steps, NaN losses."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as L
from torch.utils.data import Subset

from conftest import kiln, small_config, write_config
from torchkiln.data.digits import Digits
from torchkiln.data.loaders import make_loader
from torchkiln.engine.checkpoint import load_checkpoint
from torchkiln.engine.settings import make_trainer
from torchkiln.engine.step import OptimizerStep, check_precision
from torchkiln.errors import ConfigError
from torchkiln.loggers.base import Logger
from torchkiln.models.small import MLP, SmallCNN
from torchkiln.seeding import fingerprint


@pytest.fixture(scope="module")
def digits():
    return Digits()


def loader(ds, n, batch, seed=0):
    return make_loader(Subset(ds, range(n)), batch, train=True, seed=seed)


def fixed_batch(ds, n=64):
    x = torch.stack([ds[i][0] for i in range(n)])
    y = torch.stack([ds[i][1] for i in range(n)])
    return x, y


class StepRows(Logger):
    def __init__(self):
        self.rows = []

    def log_steps(self, rows):
        self.rows.extend(rows)


# ------------------------------------------------------------------------------------------
# clipping sees unscaled gradients
# ------------------------------------------------------------------------------------------
class InspectingStep(OptimizerStep):
    """Records the gradients the clip sees (the real clip runs afterwards)."""

    def clip(self, params, want_norm):
        self.seen = [p.grad.detach().clone() for p in params]
        return super().clip(params, want_norm)


@pytest.mark.parametrize("mode,clip", [("norm", 0.05), ("value", 1e-3)])
def test_clip_sees_unscaled_gradients_under_a_large_scale(digits, mode, clip):
    x, y = fixed_batch(digits)
    torch.manual_seed(0)
    model = MLP(num_classes=10, hidden=[32])
    ref = copy.deepcopy(model)

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    step = InspectingStep(opt, device="cpu", precision="fp16", grad_clip=clip, grad_clip_mode=mode,
                          scaler_options={"init_scale": 2.0**14})
    with step.autocast():
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
    assert out.dtype == torch.float16
    step.backward(loss)
    assert model.head.weight.grad.abs().max() > 100  # what backward left is scaled by 2**14
    result = step.step(want_norm=True)
    assert result.stepped and step.skipped == 0

    # The same step by hand, without any scaler: fp16 autocast forward, plain backward, clip, step.
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    with torch.autocast("cpu", dtype=torch.float16):
        ref_loss = nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    grads = [p.grad.clone() for p in ref.parameters()]
    ref_norm = torch.nn.utils.get_total_norm(grads)
    assert ref_norm > 0.05  # so the clip really changes the step
    if mode == "norm":
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
    else:
        assert max(g.abs().max() for g in grads) > clip
        torch.nn.utils.clip_grad_value_(ref.parameters(), clip)
    ref_opt.step()

    for seen, g in zip(step.seen, grads):
        torch.testing.assert_close(seen, g, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(result.grad_norm, ref_norm, rtol=2e-3, atol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-6)


def test_fp16_scaler_state_is_checkpointed(digits, tmp_path):
    torch.manual_seed(0)
    model = MLP(num_classes=10, hidden=[16])
    trainer = make_trainer(model, torch.optim.Adam(model.parameters(), 1e-3), device="cpu", precision="fp16",
                      epochs=1, progress=False, run_dir=tmp_path, scaler_options={"growth_interval": 3})
    trainer.fit(loader(digits, 640, 64))
    scale = trainer.stepper.scaler.get_scale()
    assert scale == 65536.0 * 2**3  # 10 good steps, growing every 3
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert state["step"]["scaler"]["scale"] == scale
    fresh = make_trainer(MLP(num_classes=10, hidden=[16]), torch.optim.Adam(model.parameters(), 1e-3),
                    device="cpu", precision="fp16", progress=False, scaler_options={"growth_interval": 3})
    fresh.load_state_dict(state)
    assert fresh.stepper.scaler.get_scale() == scale
    assert fresh.stepper.scaler.state_dict()["_growth_tracker"] == 1


def test_a_precision_the_device_cannot_run_is_a_config_error():
    with pytest.raises(ConfigError, match="precision"):
        check_precision("bf16", torch.device("meta"))
    with pytest.raises(ConfigError, match="precision"):
        check_precision("16-mixed", torch.device("cpu"))


# ------------------------------------------------------------------------------------------
# accumulation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [0, -2, "abc", 1.5])
def test_accumulate_below_one_is_refused_not_made_one(accumulate):
    from torchkiln.errors import SettingError

    with pytest.raises(SettingError, match=rf"^accumulate: expected a whole number of at least 1; found {accumulate!r}$"):
        OptimizerStep(accumulate=accumulate)
    model = nn.Linear(4, 2)
    with pytest.raises(SettingError, match=r"^accumulate:"):
        make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulate=accumulate, progress=False)
    assert OptimizerStep(accumulate=3).accumulate == 3


def train_weights(ds, batch, accumulate, epochs=1):
    torch.manual_seed(0)
    model = MLP(num_classes=10, hidden=[32])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = make_trainer(model, opt, device="cpu", accumulate=accumulate, epochs=epochs, progress=False)
    trainer.fit(loader(ds, 1258, batch))
    return model.state_dict(), trainer.loop.global_step


def test_accumulating_4_batches_of_8_equals_one_batch_of_32(digits):
    # 1258 samples: 157 full batches of 8 and one of 2, so the last group holds 8 + 2 samples.
    big, big_steps = train_weights(digits, 32, 1)
    small, small_steps = train_weights(digits, 8, 4)
    assert small_steps == big_steps == 40  # the epoch's last, shorter group is stepped
    for k in big:
        torch.testing.assert_close(small[k], big[k], rtol=0, atol=1e-6)


def test_last_shorter_group_is_stepped(digits):
    rows = StepRows()
    torch.manual_seed(0)
    model = MLP(num_classes=10, hidden=[16])
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu", accumulate=4,
                      epochs=1, progress=False, loggers=[rows])
    last_batch = []
    model.head.register_forward_hook(lambda m, i, o: last_batch.append(o.shape[0]))
    trainer.fit(loader(digits, 64 * 10 + 5, 64))  # 11 batches -> groups of 4, 4 and 3
    assert trainer.loop.global_step == 3
    assert last_batch[-1] == 5
    assert all(r["train/grad_norm"] > 0 for _, r in rows.rows)
    assert model.head.weight.grad is None  # the final group's gradients were consumed by a step


# ------------------------------------------------------------------------------------------
# autocast
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("32", torch.float32)])
def test_autocast_is_really_active_in_the_step(digits, precision, dtype):
    torch.manual_seed(0)
    model = MLP(num_classes=10, hidden=[16])
    seen = []
    model.head.register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
    trainer = make_trainer(model, torch.optim.Adam(model.parameters(), 1e-3), device="cpu", precision=precision,
                      epochs=1, progress=False)
    trainer.fit(loader(digits, 256, 64))
    train_dtypes = {d for training, d in seen if training}
    assert train_dtypes == {dtype}
    assert model.head.weight.dtype == torch.float32  # master weights stay fp32


# ------------------------------------------------------------------------------------------
# skipped steps
# ------------------------------------------------------------------------------------------
def test_inf_gradient_under_the_scaler_skips_optimizer_and_scheduler(digits, tmp_path, caplog):
    from torchkiln.loggers import JSONLLogger

    torch.manual_seed(0)
    model = MLP(num_classes=10, hidden=[16])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = L.ExponentialLR(opt, gamma=0.9)
    rows = StepRows()
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 5 else grad

    model.head.weight.register_hook(poison)
    trainer = make_trainer(model, opt, scheduler=sched, scheduler_interval="step", device="cpu", precision="fp16",
                      epochs=1, progress=False, run_dir=tmp_path, loggers=[rows, JSONLLogger(tmp_path)],
                      scaler_options={"init_scale": 256.0}, log_every_n_steps=3)
    weights = []
    model.head.register_forward_pre_hook(lambda m, i: weights.append(m.weight.detach().clone()))
    with caplog.at_level(logging.INFO, logger="torchkiln"):
        summary = trainer.fit(loader(digits, 640, 64))

    assert trainer.loop.global_step == 10
    assert trainer.stepper.skipped == summary["skipped_steps"] == 1
    assert sched.last_epoch == 9  # the scheduler advanced on the 9 real steps only
    assert all(s["step"] == 9 for s in opt.state.values())  # so did the optimizer
    torch.testing.assert_close(weights[5], weights[4], rtol=0, atol=0)  # step 5 changed nothing
    assert not torch.equal(weights[4], weights[3])
    lrs = [r["lr/group0"] for _, r in rows.rows]
    expected = [1e-2 * 0.9**k for k in range(5)] + [1e-2 * 0.9**k for k in range(4, 9)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[4] == lrs[5]
    assert "step 5 skipped by the fp16 GradScaler" in caplog.text
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/skipped_steps") == 1.0 for r in logged)


# ------------------------------------------------------------------------------------------
# non-finite losses
# ------------------------------------------------------------------------------------------
NAN_LOSS = '''
import torch
from torch import nn


class NaNAt(nn.Module):
    """Cross-entropy, except that training call number `at` returns NaN."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, outputs, targets):
        loss = nn.functional.cross_entropy(outputs, targets)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                return loss * float("nan")
        return loss
'''


def nan_run(tmp_path, on_nonfinite):
    (tmp_path / "nanloss.py").write_text(NAN_LOSS)
    cfg = small_config(tmp_path, loss={"type": "nanloss:NaNAt", "args": {"at": 30}},
                       trainer={"epochs": 2, "monitor": "val/accuracy", "on_nonfinite": on_nonfinite},
                       logging={"plots": False})
    from conftest import ROOT

    proc = kiln("train", "-c", str(write_config(tmp_path, cfg)),
                env={"PYTHONPATH": f"{ROOT / 'src'}:{tmp_path}"})
    run = next((tmp_path / "runs" / "t").iterdir())
    return proc, run


def test_nan_loss_stops_the_run_and_keeps_best(tmp_path):
    proc, run = nan_run(tmp_path, "stop")
    assert proc.returncode == 2, proc.stderr
    # 1258 training digits in batches of 64: 20 per epoch, so the 30th is epoch 2's 10th
    assert "non-finite loss (nan) at epoch 2, step 30 (batch 10)" in proc.stderr
    assert "Traceback" not in proc.stderr
    best = load_checkpoint(run / "checkpoints" / "best.ckpt")
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert best["loop"]["epoch"] == last["loop"]["epoch"] == 1
    assert best["loop"]["best"] == best["loop"]["history"][0]["val/accuracy"] > 0.2
    assert all(torch.isfinite(v).all() for v in best["model"].values())
    assert fingerprint(best["model"]) == fingerprint(last["model"])
    # the run says how it ended: the error line in train.log, summary.json and `kiln report`
    assert "ERROR error: non-finite loss (nan) at epoch 2, step 30" in (run / "train.log").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["error"].startswith("non-finite loss (nan)") and summary["epochs_completed"] == 1
    report = kiln("report", str(run), "-o", str(tmp_path / "report"))
    assert report.returncode == 0 and "failed (epoch 1 of 2)" in report.stdout, report.stdout + report.stderr


def test_nan_loss_skip_batch(tmp_path):
    proc, run = nan_run(tmp_path, "skip_batch")
    assert proc.returncode == 0, proc.stderr
    log = (run / "train.log").read_text()
    assert "skipped batch 10 of epoch 2: non-finite loss nan" in log
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["loop"]["epoch"] == 2
    assert last["loop"]["global_step"] == 39  # the skipped batch took no optimizer step
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in last["loop"]["history"])


class NaNInEval(nn.Module):
    def forward(self, outputs, targets):
        loss = nn.functional.cross_entropy(outputs, targets)
        return loss if torch.is_grad_enabled() else loss * float("nan")


def test_a_nan_metric_never_becomes_best(digits, tmp_path):
    torch.manual_seed(0)
    model = MLP(num_classes=10, hidden=[16])
    trainer = make_trainer(model, torch.optim.Adam(model.parameters(), 1e-2), NaNInEval(), device="cpu", epochs=2,
                      monitor="val/loss", progress=False, run_dir=tmp_path)
    summary = trainer.fit(loader(digits, 256, 64), loader(digits, 128, 64))
    assert all(h["val/loss"] != h["val/loss"] for h in trainer.loop.history)  # NaN every epoch
    assert summary["best"] is None and summary["best_epoch"] is None
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


# ------------------------------------------------------------------------------------------
# memory layout and optimizer groups
# ------------------------------------------------------------------------------------------
def test_channels_last_reaches_weights_and_activations(digits):
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, width=8)
    conv = model.features[3]  # 8 -> 16 channels, so both layouts differ
    seen = []
    conv.register_forward_pre_hook(lambda m, i: seen.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), device="cpu", channels_last=True,
                      epochs=1, progress=False)
    trainer.fit(loader(digits, 128, 64))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    assert seen and all(seen)


def test_no_decay_and_lr_mult_groups(tmp_path):
    from torchkiln.config.build import build_optimizer
    from torchkiln.config.load import resolve

    cfg = resolve(small_config(tmp_path, model={"type": "SmallCNN", "args": {"num_classes": 10, "width": 8}},
                               optimizer={"type": "AdamW", "args": {"lr": 0.01, "weight_decay": 0.05},
                                          "no_decay": ["bias", "norm"],
                                          "groups": [{"params": "head.*", "lr_mult": 10}]}), "test")
    model = SmallCNN(num_classes=10, width=8)
    opt = build_optimizer(cfg, model)
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = where[id(p)]
        is_norm = name.startswith("features.") and p.dim() == 1  # BatchNorm weight and bias
        no_decay = name.endswith("bias") or is_norm
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
        assert g["lr"] == pytest.approx(0.1 if name.startswith("head.") else 0.01), name
    assert len(where) == len(list(model.parameters()))
    assert sorted((round(g["lr"], 9), g["weight_decay"]) for g in opt.param_groups) == [
        (0.01, 0.0), (0.01, 0.05), (0.1, 0.0), (0.1, 0.05)]

    # A real step: with zero gradients AdamW moves only the decayed weights.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p)
        assert moved == (where[id(p)]["weight_decay"] > 0), name


def test_group_pattern_matching_nothing_is_a_config_error(tmp_path):
    from torchkiln.config.build import build_optimizer
    from torchkiln.config.load import resolve

    cfg = resolve(small_config(tmp_path, optimizer={"type": "Adam", "args": {"lr": 0.01},
                                                    "groups": [{"params": "haed.*", "lr_mult": 10}]}), "test")
    with pytest.raises(ConfigError, match=r"optimizer.groups.0.params: pattern 'haed.\*' matches no parameter"):
        build_optimizer(cfg, MLP(num_classes=10, hidden=[16]))


def test_deferred_nan_check_names_the_step_and_saves_nothing_after_it(tmp_path, monkeypatch):
    """The accelerator path (no sync per step), forced on the CPU: the NaN of step 30 is found at
    the step-32 checkpoint, which is then not written; the message names step 30."""
    from torchkiln.commands.train import build_trainer
    from torchkiln.config.load import resolve
    from torchkiln.errors import TrainingError

    (tmp_path / "nanloss_deferred.py").write_text(NAN_LOSS)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = small_config(tmp_path, loss={"type": "nanloss_deferred:NaNAt", "args": {"at": 30}},
                       trainer={"epochs": 2, "monitor": "val/accuracy", "checkpoint_every_steps": 32},
                       logging={"plots": False, "every_n_steps": 100})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer, loaders = build_trainer(resolve(cfg, "test"), run_dir, progress=False)
    trainer.defer_finite_check = True
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 2, step 30 \(batch 10\)"):
        trainer.fit(loaders["train"], loaders["val"])
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["best.ckpt", "last.ckpt"]  # no step-000032.ckpt
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["loop"]["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())
