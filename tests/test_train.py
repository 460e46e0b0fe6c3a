"""Real short trainings on digits: run directory, checkpoints, early stop, resume, reproducibility."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import DataLoader, TensorDataset

from conftest import write_config
from torchkiln import make_trainer
from torchkiln.commands.train import train
from torchkiln.config.load import load_config, resolve
from torchkiln.engine.checkpoint import load_checkpoint
from torchkiln.metrics import build_metrics
from torchkiln.models import MLP


def _run(cfg: dict, tmp_path: Path, resume=None) -> tuple[Path, dict]:
    return train(resolve(cfg, "test"), resume=resume, progress=False)


def _csv(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_default_config_reaches_97_percent(tmp_path, cli):
    code, _, err = cli("train", "-q", f"output_dir={tmp_path / 'runs'}")
    assert code == 0, err
    run_dir = next((tmp_path / "runs" / "digits-cnn").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["monitor"] == "val/accuracy"
    assert summary["best"] >= 0.97
    code, out, _ = cli("test", str(run_dir))
    assert code == 0 and "test/accuracy" in out
    saved = json.loads((run_dir / "test_metrics.json").read_text())
    assert saved["test/accuracy"] >= 0.95 and saved["samples"] == 180


def test_run_directory_layout_and_files(tmp_path, cfg_factory):
    run_dir, summary = _run(cfg_factory(trainer={"epochs": 3, "monitor": "val/accuracy"}), tmp_path)
    assert run_dir.parent == tmp_path / "runs" / "t"
    for name in ("config.yaml", "train.log", "metrics.csv", "metrics.jsonl", "summary.json",
                 "checkpoints/last.ckpt", "checkpoints/best.ckpt", "plots/curves.png"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    rows = _csv(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train/loss", "val/loss", "val/accuracy", "val/f1_macro", "lr/group0"} <= set(rows[0])
    # The resolved config is enough to rerun: it validates and names the same pieces.
    again = load_config(run_dir / "config.yaml")
    assert again.model.type == "MLP" and again.trainer.epochs == 3
    log_text = (run_dir / "train.log").read_text()
    assert summary["fingerprint"] in log_text and "epoch 3/3" in log_text
    # Checkpoints are plain data, loadable with weights_only=True, holding the config as a dict.
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(ckpt["config"], dict) and ckpt["config"]["model"]["type"] == "MLP"
    assert ckpt["loop"]["epoch"] == 3 and set(ckpt) >= {"model", "optimizer", "schedule", "rng"}


def test_best_checkpoint_follows_monitor_not_save_period(tmp_path, cfg_factory):
    cfg = cfg_factory(trainer={"epochs": 4, "monitor": "val/loss", "save_period": 100})
    run_dir, summary = _run(cfg, tmp_path)
    rows = _csv(run_dir)
    losses = [float(r["val/loss"]) for r in rows]
    best_epoch = int(np.argmin(losses)) + 1
    assert summary["mode"] == "min" and summary["best_epoch"] == best_epoch
    best = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert best["loop"]["epoch"] == best_epoch
    assert best["loop"]["best"] == pytest.approx(min(losses))
    assert not list((run_dir / "checkpoints").glob("epoch-*.ckpt"))


def test_save_period_writes_numbered_checkpoints(tmp_path, cfg_factory):
    run_dir, _ = _run(cfg_factory(trainer={"epochs": 4, "save_period": 2}), tmp_path)
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("epoch-*.ckpt"))
    assert names == ["epoch-002.ckpt", "epoch-004.ckpt"]


def test_early_stopping_with_patience(tmp_path, cfg_factory):
    # lr 0: nothing improves after the first epoch, so patience 2 stops after epoch 3.
    cfg = cfg_factory(optimizer={"type": "SGD", "args": {"lr": 0.0}},
                      trainer={"epochs": 10, "early_stop": 2, "monitor": "val/accuracy"})
    run_dir, summary = _run(cfg, tmp_path)
    assert summary["stopped_early"] is True
    assert summary["epochs_completed"] == 3 and summary["best_epoch"] == 1
    assert len(_csv(run_dir)) == 3


def test_resume_continues_epoch_count(tmp_path, cfg_factory, cli):
    path = write_config(tmp_path, cfg_factory(trainer={"epochs": 2}))
    assert cli("train", "-q", "-c", str(path))[0] == 0
    run_dir = next((tmp_path / "runs" / "t").iterdir())
    code, _, err = cli("train", "-q", "--resume", str(run_dir), "trainer.epochs=4")
    assert code == 0, err
    rows = _csv(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["loop"]["epoch"] == 4
    assert len(list((tmp_path / "runs" / "t").iterdir())) == 1  # same run directory


def test_resume_matches_uninterrupted_run(tmp_path, cfg_factory):
    base = cfg_factory(model={"type": "SmallCNN", "args": {"num_classes": 10, "width": 8}},
                       scheduler={"type": "OneCycleLR", "args": {"max_lr": 0.01}},
                       trainer={"epochs": 3})
    full_dir, _ = _run({**base, "name": "full"}, tmp_path)
    part = {**base, "name": "part", "trainer": {**base["trainer"], "epochs": 3}}
    # Stop after epoch 2 by training a 3-epoch schedule for 2 epochs is not the same run, so
    # train 3 epochs, then resume from epoch 2's numbered checkpoint and compare.
    part["trainer"]["save_period"] = 1
    part_dir, _ = _run(part, tmp_path)
    ckpt = part_dir / "checkpoints" / "epoch-002.ckpt"
    resumed_dir, _ = _run(part, tmp_path, resume=ckpt)
    a = load_checkpoint(full_dir / "checkpoints" / "last.ckpt")["model"]
    b = load_checkpoint(resumed_dir / "checkpoints" / "last.ckpt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_rows, resumed_rows = _csv(full_dir), _csv(resumed_dir)
    assert [r["val/loss"] for r in full_rows] == [r["val/loss"] for r in resumed_rows]


def test_same_seed_same_fingerprint_and_metrics(tmp_path, cfg_factory):
    cfg = cfg_factory(model={"type": "SmallCNN", "args": {"num_classes": 10, "width": 8}})
    d1, s1 = _run({**cfg, "name": "a"}, tmp_path)
    d2, s2 = _run({**cfg, "name": "b"}, tmp_path)
    d3, s3 = _run({**cfg, "name": "c", "seed": 1}, tmp_path)
    assert s1["fingerprint"] == s2["fingerprint"] != s3["fingerprint"]

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    assert strip(_csv(d1)) == strip(_csv(d2))
    assert strip(_csv(d1)) != strip(_csv(d3))


def test_python_api_without_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16
    y = torch.tensor(y)
    train_dl = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=64, shuffle=True)
    val_dl = DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=50)
    model = MLP(num_classes=10, hidden=[64])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = make_trainer(model, opt, torch.nn.CrossEntropyLoss(), metrics=build_metrics(["accuracy"], 10),
                      epochs=3, progress=False, monitor="val/accuracy")
    summary = trainer.fit(train_dl, val_dl)
    assert summary["best"] > 0.85
    assert list(tmp_path.iterdir()) == []  # no run directory, no logs, nothing on disk
    preds = trainer.predict(val_dl).argmax(1)
    assert accuracy_score(y[1400:], preds) == pytest.approx(trainer.validate(val_dl)["val/accuracy"])


def test_constructing_a_trainer_has_no_side_effects(tmp_path):
    model = MLP(num_classes=10)
    make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("n, batch", [(203, 37), (1053, 7)], ids=["6-batches", "151-batches"])
def test_epoch_metrics_are_exact_over_uneven_batches(n, batch):
    """151 batches are three of the metric buffer's groups (64, 64, 23 batches): the epoch's
    numbers are still over every sample, in validation and in training."""
    torch.manual_seed(0)
    classes = 5
    logits = torch.randn(n, classes)
    targets = torch.randint(0, classes, (n,))

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, idx):
            return logits[idx] + self.w

    loader = DataLoader(TensorDataset(torch.arange(n), targets), batch_size=batch)  # a short last batch
    model = Fixed()
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      metrics=build_metrics(["accuracy", "f1_macro"], classes), progress=False, epochs=1)
    got = trainer.validate(loader)
    pred = logits.argmax(1)
    assert got["val/accuracy"] == pytest.approx(accuracy_score(targets, pred), abs=1e-6)
    assert got["val/f1_macro"] == pytest.approx(f1_score(targets, pred, average="macro"), abs=1e-6)
    expected_loss = torch.nn.functional.cross_entropy(logits, targets).item()
    assert got["val/loss"] == pytest.approx(expected_loss, rel=1e-5)
    # training moves only a shift of every logit (the predictions stay): the train metrics are exact too
    final = trainer.fit(loader)["final"]
    assert final["train/accuracy"] == pytest.approx(accuracy_score(targets, pred), abs=1e-6)
    assert final["train/f1_macro"] == pytest.approx(f1_score(targets, pred, average="macro"), abs=1e-6)


def test_a_callback_state_a_resume_could_not_load_is_refused_at_the_first_save(tmp_path):
    """A numpy array (or any object) in a callback's state would be written, then refused by every
    resume (weights_only): the first save names the callback and where in its state it is."""
    import numpy as np

    from torchkiln.engine.callbacks import Callback
    from torchkiln.engine.checkpoint import not_plain
    from torchkiln.errors import SettingError

    class Keeps(Callback):
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"seen": [1, 2], "hist": self.value}

    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=8)
    for value, refused in ((np.zeros(3), "numpy.ndarray at ['hist']"), (torch.zeros(3), None)):
        model = torch.nn.Linear(4, 2)
        trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, progress=False,
                               callbacks=[Keeps(value)], run_dir=tmp_path / f"run-{refused is None}")
        if refused:
            with pytest.raises(SettingError, match=rf"Keeps.state_dict\(\) holds a {re.escape(refused)}"):
                trainer.fit(loader)
            assert not list((tmp_path / "run-False").rglob("*.ckpt"))
        else:
            trainer.fit(loader)
            assert (tmp_path / "run-True" / "checkpoints" / "last.ckpt").is_file()
    assert not_plain({"a": [1, {"b": (2.0, "x", None, torch.ones(1), {3})}]}) is None
    assert not_plain({"a": [1, {"b": frozenset()}]}) == "a builtins.frozenset at ['a'][1]['b']"


def test_a_second_fit_continues_the_first(tmp_path):
    """fit, then fit again with more epochs: the same weights, LRs and history as one longer fit
    (the loop state, schedule and run directory go on; nothing restarts)."""
    import signal

    from torchkiln.engine.callbacks import Callback
    from torchkiln.engine.state import StopRequested
    from torchkiln.errors import SettingError

    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)),
                        batch_size=8)

    def trainer_for(epochs, run_dir):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        from torchkiln import run_loggers

        return make_trainer(model, opt, epochs=epochs, progress=False, run_dir=run_dir,
                            loggers=run_loggers(run_dir, model, tensorboard=False, plots=False),
                            scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))

    once = trainer_for(3, tmp_path / "once")
    once.fit(loader, loader)
    twice = trainer_for(2, tmp_path / "twice")
    first = twice.fit(loader, loader)
    assert twice.fit(loader, loader)["global_step"] == first["global_step"] == 10  # all epochs done: nothing runs
    twice.epochs = 3
    summary = twice.fit(loader, loader)
    assert summary["epochs_completed"] == 3 and summary["global_step"] == 15
    assert summary["fingerprint"] == first["fingerprint"]
    assert all(torch.equal(a, b) for a, b in zip(once.raw_model.parameters(), twice.raw_model.parameters()))
    assert [h["lr/group0"] for h in twice.loop.history] == [h["lr/group0"] for h in once.loop.history]
    rows = list(csv.DictReader(open(tmp_path / "twice" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]

    class StopAt(Callback):  # a stop mid-epoch (as Ctrl-C in a notebook)
        def on_train_batch_end(self, trainer, batch, samples):
            if trainer.loop.epoch == 0 and batch == 2:
                trainer.request_stop(signal.SIGINT)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    stopped = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), epochs=2, progress=False,
                           callbacks=[StopAt()], run_dir=tmp_path / "stopped")
    from torchkiln.data.loaders import make_loader

    resumable = make_loader(loader.dataset, batch_size=8, train=True, seed=0)
    with pytest.raises(StopRequested):
        stopped.fit(resumable)
    with pytest.raises(SettingError, match=r"stopped in epoch 1 \(after batch 3\).*resume=PATH"):
        stopped.fit(resumable)
    stopped.request_stop(None)
    assert stopped.fit(resumable, resume=tmp_path / "stopped")["epochs_completed"] == 2  # a run directory resumes


# ------------------------------------------------------------------------------------------
# API mistakes: one line naming the setting and the fix, at construction (or at the top of fit)
# ------------------------------------------------------------------------------------------
def _tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _tiny_loader(n: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 4), torch.randint(0, 3, (n,))), batch_size=4)


@pytest.mark.parametrize("settings, message", [
    ({"metrics": ["accuracy"]},
     r"^metrics: names need the task and class count: metrics=build_metrics\(\['accuracy'\], num_classes=N\)"),
    ({"metrics": "accuracy"}, r"^metrics: names need the task and class count"),
    ({"metrics": [object()]}, r"^metrics: object is not a metric"),
    ({"loss_fn": torch.nn.CrossEntropyLoss},
     r"^loss_fn: got the class CrossEntropyLoss, not a loss: pass CrossEntropyLoss\(\)$"),
    ({"epochs": "abc"}, r"^epochs: expected a whole number of at least 0; found 'abc'$"),
    ({"epochs": -1}, r"^epochs: expected a whole number of at least 0; found -1$"),
    ({"epochs": 2.5}, r"^epochs: expected a whole number"),
    ({"callbacks": [object()]}, r"^callbacks: object is not a torchkiln.Callback"),
    ({"callbacks": [torch.nn.Module]}, r"^callbacks: got the class Module, not a callback"),
], ids=["metric-names", "one-metric-name", "not-a-metric", "loss-class", "epochs-text", "epochs-negative",
        "epochs-fraction", "not-a-callback", "callback-class"])
def test_api_mistakes_are_setting_errors_at_construction(settings, message):
    from torchkiln.engine.trainer import Trainer
    from torchkiln.errors import SettingError

    model, opt = _tiny()
    loss = settings.pop("loss_fn", torch.nn.CrossEntropyLoss())
    with pytest.raises(SettingError, match=message):
        make_trainer(model, opt, loss, progress=False, **settings)
    with pytest.raises(SettingError, match=message):
        Trainer(model, opt, loss, **settings)


def test_an_optimizer_class_is_refused_with_how_to_build_it():
    from torchkiln.engine.trainer import Trainer
    from torchkiln.errors import SettingError

    model, _ = _tiny()
    message = r"^optimizer: got the class SGD, not an optimizer: pass SGD\(model.parameters\(\), lr=...\)$"
    with pytest.raises(SettingError, match=message):
        make_trainer(model, torch.optim.SGD, progress=False)
    with pytest.raises(SettingError, match=message):
        Trainer(model, torch.optim.SGD)


def test_one_callback_not_in_a_list_is_a_list_of_one():
    from torchkiln import Callback
    from torchkiln.engine.trainer import Trainer

    class Counter(Callback):
        epochs = 0

        def on_epoch_end(self, trainer, epoch, record):
            self.epochs += 1

    model, opt = _tiny()
    one = Counter()
    make_trainer(model, opt, progress=False, epochs=2, callbacks=one).fit(_tiny_loader())
    assert one.epochs == 2
    other = Counter()
    assert other in list(Trainer(model, opt, callbacks=other).callbacks)


def test_fit_refuses_a_loader_without_a_length_before_anything_runs():
    from torch.utils.data import IterableDataset

    from torchkiln.errors import SettingError

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(torch.randn(8, 4), torch.randint(0, 3, (8,)))

    def batches():
        yield torch.randn(4, 4), torch.randint(0, 3, (4,))

    model, opt = _tiny()
    trainer = make_trainer(model, opt, progress=False, epochs=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for loader, found in ((None, "found None"),
                          (DataLoader(Stream(), batch_size=4), r"a DataLoader over an IterableDataset \(Stream\) has none"),
                          (batches(), "a generator has none")):
        with pytest.raises(SettingError, match=rf"^train_loader: fit needs a loader with a length; {found}: give a"
                                               " map-style Dataset"):
            trainer.fit(loader)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert trainer.evaluate(DataLoader(Stream(), batch_size=4))["val/loss"] > 0  # evaluate only iterates


def test_a_dict_batch_with_other_keys_names_the_keys_it_has():
    from torchkiln.errors import DataError

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def loader(keys):
        return DataLoader([{keys[0]: x[i], keys[1]: y[i]} for i in range(8)], batch_size=4)

    model, opt = _tiny()
    trainer = make_trainer(model, opt, progress=False, epochs=1)
    with pytest.raises(DataError, match=r"^a dict batch needs the keys 'input' and 'target'; this one has 'image',"
                                        r" 'label': rename them"):
        trainer.fit(loader(("image", "label")))
    with pytest.raises(DataError, match=r"^the loss needs targets and this batch has none: a dict batch needs the"
                                        r" key 'target'"):
        trainer.fit(loader(("input", "label")))
    assert trainer.fit(loader(("input", "target")))["epochs_completed"] == 1


def test_evaluate_on_an_empty_loader_is_an_error_not_empty_numbers():
    from torchkiln.engine.trainer import Trainer
    from torchkiln.errors import TrainingError

    model, _ = _tiny()
    empty = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), batch_size=4)
    trainer = Trainer(model, metrics=build_metrics(["accuracy"], 3))
    with pytest.raises(TrainingError, match=r"^the val loader gave no samples"):
        trainer.evaluate(empty)
    with pytest.raises(TrainingError, match=r"^the test loader gave no samples"):
        trainer.test(empty)
    short = DataLoader(TensorDataset(torch.randn(3, 4), torch.randint(0, 3, (3,))), batch_size=4, drop_last=True)
    with pytest.raises(TrainingError, match="gave no samples"):
        trainer.validate(short)


def test_early_stopping_mode_is_checked_by_the_monitors_rule(tmp_path, cli):
    from conftest import small_config
    from torchkiln.callbacks.monitor import EarlyStopping
    from torchkiln.errors import SettingError

    with pytest.raises(SettingError, match=r"^EarlyStopping.mode: expected min or max; found 'maximize'$"):
        EarlyStopping(1, monitor="val/loss", mode="maximize")
    assert EarlyStopping(1, mode="max").mode == "max"
    # from a config it names the entry, not a trainer setting
    cfg = small_config(tmp_path, callbacks=[{"type": "EarlyStopping", "args": {"patience": 1, "mode": "maximize"}}])
    code, _, err = cli("config", "check", "-c", str(write_config(tmp_path, cfg)))
    assert code == 2 and "callbacks.0: EarlyStopping.mode: expected min or max; found 'maximize'" in err, err
