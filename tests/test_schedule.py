"""Each scheduler steps at its granularity: a Trainer's per-step LR trace equals a hand-written loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as L
from torch.utils.data import Subset

from conftest import kiln, small_config, write_config
from torchkiln.data.digits import Digits
from torchkiln.data.loaders import make_loader
from torchkiln.engine.schedule import LRSchedule
from torchkiln.engine.settings import make_trainer
from torchkiln.errors import ConfigError, SettingError
from torchkiln.loggers.base import Logger
from torchkiln.models.small import MLP

LR = 0.1
EPOCHS = 3
BATCH = 128  # 1497 training digits -> 12 batches per epoch, the last one short


class StepRows(Logger):
    """Keeps the per-step rows the trainer hands its loggers."""

    def __init__(self):
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_steps(self, rows):
        self.rows.extend(rows)


@pytest.fixture(scope="module")
def digits():
    ds = Digits()
    train = Subset(ds, range(1497))
    val = Subset(ds, range(1497, 1797))
    return (make_loader(train, BATCH, train=True, seed=0),
            make_loader(val, 256, train=False, seed=0))


def run_trainer(digits, make_sched, *, accumulate=1, warmup_steps=0, interval=None, fractional=True,
                groups=1, monitor="val/loss"):
    torch.manual_seed(0)
    model = MLP(num_classes=10, hidden=[16])
    params = [{"params": list(model.features.parameters())},
              {"params": list(model.head.parameters()), "lr": LR * 10}] if groups == 2 \
        else model.parameters()
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    rows = StepRows()
    trainer = make_trainer(model, opt, nn.CrossEntropyLoss(), scheduler=make_sched(opt), epochs=EPOCHS,
                      device="cpu", accumulate=accumulate, warmup_steps=warmup_steps, warmup_start=0.1,
                      scheduler_interval=interval, scheduler_fractional_epochs=fractional,
                      monitor=monitor, progress=False, loggers=[rows])
    trainer.fit(*digits)
    trace = [[r[f"lr/group{g}"] for g in range(groups)] for _, r in rows.rows]
    assert [s for s, _ in rows.rows] == list(range(1, len(rows.rows) + 1))
    return trace, trainer


def reference(make_sched, interval, steps_per_epoch, *, warmup_steps=0, warmup_start=0.1,
              metrics=None, fractional=True, groups=1):
    """The textbook loop: optimizer.step(), then the scheduler at its granularity."""
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    params = [{"params": [a]}, {"params": [b], "lr": LR * 10}] if groups == 2 else [a]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    sched = make_sched(opt)
    trace, done = [], 0
    for epoch in range(EPOCHS):
        for i in range(steps_per_epoch):
            factor = 1.0
            if done < warmup_steps:
                factor = warmup_start + (1.0 - warmup_start) * done / warmup_steps
            trace.append([g["lr"] * factor for g in opt.param_groups])
            opt.step()
            done += 1
            if interval == "step":
                if isinstance(sched, L.CosineAnnealingWarmRestarts) and fractional:
                    sched.step(epoch + i / steps_per_epoch)
                else:
                    sched.step()
        if interval == "epoch":
            sched.step()
        elif interval == "metric":
            sched.step(metrics[epoch])
    return trace


SCHEDULERS = {
    "OneCycleLR": ("step", lambda o: L.OneCycleLR(o, max_lr=0.5, total_steps=EPOCHS * 12)),
    "CyclicLR": ("step", lambda o: L.CyclicLR(o, base_lr=0.01, max_lr=0.3, step_size_up=5)),
    "CosineAnnealingWarmRestarts": ("step", lambda o: L.CosineAnnealingWarmRestarts(o, T_0=1, T_mult=2)),
    "StepLR": ("epoch", lambda o: L.StepLR(o, step_size=1, gamma=0.5)),
    "MultiStepLR": ("epoch", lambda o: L.MultiStepLR(o, milestones=[1, 2], gamma=0.3)),
    "ExponentialLR": ("epoch", lambda o: L.ExponentialLR(o, gamma=0.7)),
    "CosineAnnealingLR": ("epoch", lambda o: L.CosineAnnealingLR(o, T_max=EPOCHS)),
    "PolynomialLR": ("epoch", lambda o: L.PolynomialLR(o, total_iters=EPOCHS, power=2.0)),
    "LinearLR": ("epoch", lambda o: L.LinearLR(o, start_factor=0.2, total_iters=2)),
    # val/loss never improves by 10x on its best: the LR is cut after every epoch (the mode agrees with the monitor's)
    "ReduceLROnPlateau": ("metric", lambda o: L.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=0, threshold=10.0)),
}


@pytest.mark.parametrize("warmup", [0, 7], ids=["plain", "warmup"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_trace_matches_hand_written_loop(digits, name, warmup):
    interval, make = SCHEDULERS[name]
    trace, trainer = run_trainer(digits, make, warmup_steps=warmup)
    assert trainer.schedule.interval == interval
    metrics = [h["val/loss"] for h in trainer.loop.history]
    expected = reference(make, interval, 12, warmup_steps=warmup, metrics=metrics)
    assert len(trace) == EPOCHS * 12
    assert trace == expected  # exact, not approximately
    assert len({t[0] for t in trace}) > 1, "the schedule should move the LR"


@pytest.mark.parametrize("name", ["OneCycleLR", "CosineAnnealingWarmRestarts", "StepLR", "ReduceLROnPlateau"])
def test_lr_trace_with_accumulation_and_two_groups(digits, name):
    interval, make = SCHEDULERS[name]
    if name == "OneCycleLR":  # ceil(12 / 5) = 3 optimizer steps per epoch
        def make(o):
            return L.OneCycleLR(o, max_lr=[0.5, 5.0], total_steps=EPOCHS * 3)
    trace, trainer = run_trainer(digits, make, accumulate=5, warmup_steps=4, groups=2)
    assert trainer.loop.global_step == EPOCHS * 3
    metrics = [h["val/loss"] for h in trainer.loop.history]
    expected = reference(make, interval, 3, warmup_steps=4, metrics=metrics, groups=2)
    assert trace == expected
    assert all(math.isclose(b, 10 * a) for a, b in trace) or name == "OneCycleLR"


def test_cosine_warm_restarts_in_steps(digits):
    def make(o):
        return L.CosineAnnealingWarmRestarts(o, T_0=5)

    trace, _ = run_trainer(digits, make, fractional=False)
    assert trace == reference(make, "step", 12, fractional=False)
    # T_0 = 5 counted in optimizer steps: the LR restarts at steps 6, 11, 16, ...
    assert trace[5] == trace[0] == [LR] and trace[10] == [LR]
    # ... which is not what the fractional-epoch stepping gives
    assert trace != reference(make, "step", 12, fractional=True)


def test_interval_override_steps_an_epoch_scheduler_per_step(digits):
    def make(o):
        return L.ExponentialLR(o, gamma=0.9)

    trace, trainer = run_trainer(digits, make, interval="step")
    assert trainer.schedule.interval == "step"
    assert trace == reference(make, "step", 12)


def test_plateau_per_step_is_a_config_error():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(ConfigError, match="ReduceLROnPlateau"):
        LRSchedule(opt, L.ReduceLROnPlateau(opt), interval="step")


def test_an_interval_other_than_step_or_epoch_is_refused_not_kept():
    """'batch' used to be kept and the scheduler stepped per epoch."""
    from torchkiln.errors import SettingError

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    for scheduler in (L.StepLR(opt, 1), None):
        with pytest.raises(SettingError, match=r"^scheduler_interval: expected step \(after each optimizer step\) or"
                                               r" epoch; found 'batch'"):
            LRSchedule(opt, scheduler, interval="batch")
    assert LRSchedule(opt, L.StepLR(opt, 1), interval="step").interval == "step"


def test_negative_warmup_is_refused():
    from torchkiln.errors import SettingError

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(SettingError, match=r"^warmup_steps: expected a whole number of at least 0; found -5$"):
        LRSchedule(opt, warmup_steps=-5)


def test_a_scheduler_class_is_refused_with_how_to_build_it():
    from torchkiln.errors import SettingError

    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SettingError, match=r"^scheduler: got the class StepLR, not a scheduler: pass"
                                           r" StepLR\(optimizer, ...\)$"):
        make_trainer(model, opt, scheduler=L.StepLR, progress=False)


def test_cli_plateau_per_step_exits_2(tmp_path):
    cfg = small_config(tmp_path, scheduler={"type": "ReduceLROnPlateau", "interval": "step"})
    proc = kiln("train", "-c", str(write_config(tmp_path, cfg)))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert any("scheduler.interval" in ln and "ReduceLROnPlateau" in ln for ln in lines), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_cli_onecycle_total_steps_with_accumulation_and_group_lr_mult(tmp_path):
    """From a config: OneCycleLR's total_steps counts optimizer steps under accumulation, warmup
    in epochs composes, per-group lr_mult survives OneCycleLR's max_lr, and every step's LR of
    every group lands in metrics.jsonl and TensorBoard."""
    cfg = small_config(
        tmp_path,
        data={"batch_size": 100},  # 1258 training digits -> 13 batches
        optimizer={"type": "SGD", "args": {"lr": 0.1, "momentum": 0.9}, "groups": [{"params": "head.*", "lr_mult": 10}]},
        scheduler={"type": "OneCycleLR", "args": {"max_lr": 0.5}, "warmup": {"epochs": 1, "start_factor": 0.1}},
        trainer={"epochs": 3, "accumulate": 3, "monitor": "val/accuracy", "grad_clip": 1.0},
        logging={"every_n_steps": 4, "plots": False},
    )
    kiln("train", "-c", str(write_config(tmp_path, cfg)), check=True)
    run = next((tmp_path / "runs" / "t").iterdir())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "epoch" not in r]
    assert [r["step"] for r in steps] == list(range(1, 3 * 5 + 1))  # ceil(13 / 3) = 5 per epoch
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=0.1, momentum=0.9)
    sched = L.OneCycleLR(opt, max_lr=[0.5, 5.0], total_steps=15)
    for k, r in enumerate(steps):
        factor = 0.1 + 0.9 * k / 5 if k < 5 else 1.0
        assert r["lr/group0"] == opt.param_groups[0]["lr"] * factor
        assert r["lr/group1"] == opt.param_groups[1]["lr"] * factor
        assert r["train/grad_norm"] > 0
        opt.step()
        sched.step()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("lr/group0", "lr/group1", "train/grad_norm", "train/loss_step"):
        assert tag in tags
    events = acc.Scalars("lr/group1")
    step_events = [e for e in events if e.step >= 1]
    assert len({e.step for e in step_events}) >= 15
    assert acc.Scalars("train/grad_norm")[-1].value > 0


@pytest.mark.parametrize("interval,total", [(None, 4 * 7), ("epoch", 4)])
def test_onecycle_total_steps_from_epochs_steps_and_accumulation(tmp_path, interval, total):
    from torchkiln.config.build import build_scheduler
    from torchkiln.config.load import resolve

    sched = {"type": "OneCycleLR", "args": {"max_lr": 0.1}}
    if interval:
        sched["interval"] = interval
    cfg = resolve(small_config(tmp_path, scheduler=sched, trainer={"epochs": 4, "accumulate": 3}), "test")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9)
    scheduler, kwargs = build_scheduler(cfg, opt, batches_per_epoch=20)  # ceil(20 / 3) = 7 steps
    assert scheduler.total_steps == total
    assert kwargs["scheduler_interval"] == interval


def test_plateau_mode_against_the_monitor_is_refused(digits):
    """torch's default mode='min' on an accuracy cuts the LR while the run improves."""
    from torchkiln.metrics import build_metrics

    model = MLP(num_classes=10, hidden=[16])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for mode, refused in (("min", True), ("max", False)):
        def make(mode=mode):
            return make_trainer(model, opt, nn.CrossEntropyLoss(), metrics=build_metrics(["accuracy"], 10),
                                scheduler=L.ReduceLROnPlateau(opt, mode=mode), monitor="val/accuracy", progress=False)
        if refused:
            with pytest.raises(SettingError, match=r"ReduceLROnPlateau\(mode='min'\) steps on val/accuracy.*mode='max'"):
                make().resolve_monitor(has_val=True)
        else:
            make().resolve_monitor(has_val=True)
