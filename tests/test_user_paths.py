"""What a new user hit (issue 15): documented paths through `kiln` in a fresh process, schedules on
resume, ReduceLROnPlateau's mode, one-line errors that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import small_config, write_config
from torchkiln.config.load import resolve


@pytest.fixture
def kiln(cli):
    """`kiln ARGS` in this process (the fresh-process paths are test_readme's and test_registry_guard's):
    returns what a subprocess would, exit code and streams."""

    def run(*args: str, cwd=None, check: bool = False) -> SimpleNamespace:
        code, out, err = cli(*args)
        if check:
            assert code == 0, err[-2000:]
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


def _one_line_error(proc, *parts: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------
# 1. losses by name from a config, on the CLI path
# ------------------------------------------------------------------------------------------
def test_torchkiln_losses_and_a_weighted_list_train_from_a_config(tmp_path, kiln):
    loss = [{"type": "FocalLoss", "args": {"gamma": 2}, "weight": 1.0},
            {"type": "LabelSmoothingLoss", "args": {"smoothing": 0.1}, "weight": 0.5},
            {"type": "F1Loss", "weight": 0.2}]
    cfg = small_config(tmp_path, loss=loss, trainer={"epochs": 1, "monitor": "val/accuracy"},
                       logging={"progress": False, "plots": False, "tensorboard": False})
    proc = kiln("train", "-c", str(write_config(tmp_path, cfg)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = kiln("config", "check", "-c", str(write_config(tmp_path, cfg)), "loss={type: FocalLoss}",
                cwd=tmp_path, check=True)
    assert "loss       FocalLoss" in proc.stdout


# ------------------------------------------------------------------------------------------
# 2. continuing a finished run with more epochs
# ------------------------------------------------------------------------------------------
def _lrs(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["lr/group0"] for r in rows if "epoch" not in r]


def test_a_finished_onecycle_run_continues_with_more_epochs_on_a_new_plan(tmp_path, kiln):
    cfg = small_config(tmp_path, scheduler={"type": "OneCycleLR", "args": {"max_lr": 0.02}},
                       trainer={"epochs": 1, "monitor": "val/accuracy"},
                       logging={"progress": False, "plots": False, "tensorboard": False, "every_n_steps": 1})
    path = write_config(tmp_path, cfg)
    kiln("train", "-c", str(path), cwd=tmp_path, check=True)
    run_dir = next((tmp_path / "runs" / "t").iterdir())
    steps = len(_lrs(run_dir))
    proc = kiln("train", "--resume", str(run_dir), "trainer.epochs=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"re-planned for {2 * steps} steps (the checkpoint planned {steps})" in proc.stderr
    lrs = _lrs(run_dir)
    assert len(lrs) == 2 * steps
    # the second epoch follows the 2-epoch plan from step `steps` on: it rises again, then anneals
    second = lrs[steps:]
    assert max(second) > 10 * lrs[steps - 1] and second[-1] < 0.01 * max(second)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 2
    assert "re-planned" in (run_dir / "train.log").read_text()


def test_a_onecycle_length_shorter_than_the_run_is_refused_before_anything_runs(tmp_path, kiln):
    cfg = small_config(tmp_path, scheduler={"type": "OneCycleLR", "args": {"max_lr": 0.02, "total_steps": 5}},
                       trainer={"epochs": 1})
    proc = kiln("train", "-c", str(write_config(tmp_path, cfg)), cwd=tmp_path)
    _one_line_error(proc, "cfg.yaml: scheduler.args.total_steps", "at least")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# 3. ReduceLROnPlateau follows the monitor
# ------------------------------------------------------------------------------------------
def test_plateau_mode_follows_the_monitor_and_does_not_cut_an_improving_accuracy(tmp_path):
    from torchkiln.commands.train import build_parts

    cfg = small_config(tmp_path, scheduler={"type": "ReduceLROnPlateau", "args": {"patience": 0, "factor": 0.5}})
    trainer, _, _ = build_parts(resolve(cfg), progress=False)
    sched = trainer.schedule
    assert sched.scheduler.mode == "max"
    before = sched.lrs()
    # the other numbers of the record move the other way: stepping on any of them would cut
    # the LR while the accuracy improves, and keep it when the accuracy falls
    for acc in (0.5, 0.6, 0.7, 0.8):  # improving every epoch
        sched.on_epoch_end({"train/loss": 1 - acc, "val/loss": 1 - acc, "val/accuracy": acc, "lr/group0": 1 - acc})
    assert sched.lrs() == before
    sched.on_epoch_end({"train/loss": 0.9, "val/loss": 0.9, "val/accuracy": 0.1, "lr/group0": 0.9})  # a worse epoch (patience 0)
    assert sched.lrs()[0] == pytest.approx(before[0] * 0.5)

    loss_cfg = small_config(tmp_path, scheduler={"type": "ReduceLROnPlateau"}, trainer={"monitor": "val/loss"})
    assert build_parts(resolve(loss_cfg), progress=False)[0].schedule.scheduler.mode == "min"


def test_plateau_mode_contradicting_the_monitor_is_a_config_error(tmp_path, kiln):
    cfg = small_config(tmp_path, scheduler={"type": "ReduceLROnPlateau", "args": {"mode": "min"}})
    proc = kiln("config", "check", "-c", str(write_config(tmp_path, cfg)), cwd=tmp_path)
    _one_line_error(proc, "scheduler.args.mode", "val/accuracy", "max")


# ------------------------------------------------------------------------------------------
# 6. mistakes end in one line, before anything is created
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, parts", [
    ("optimizer.args.lr=abc", ("optimizer.args.lr", "expected a number", "'abc'")),
    ("trainer.monitor=val/acc", ("trainer.monitor", "did you mean 'val/accuracy'")),
    ("data.batch_size=abc", ("data.batch_size",)),
    ("model.args.num_classes=5", ("model.args.num_classes", "the data has 10 classes", "set 10")),
])
def test_a_bad_value_names_its_key_and_leaves_no_run_directory(tmp_path, override, parts, kiln):
    path = write_config(tmp_path, small_config(tmp_path))
    proc = kiln("train", "-c", str(path), override, cwd=tmp_path)
    line = _one_line_error(proc, *parts)
    assert line.startswith(f"error: {path}"), line
    assert "run directory" not in proc.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# 7. from a reading of the code
# ------------------------------------------------------------------------------------------
def test_padded_shards_weigh_accumulated_batches_alike_on_every_rank():
    from torchkiln.data.loaders import ResumableBatchSampler, epoch_batch_sizes

    data = TensorDataset(torch.zeros(11, 1))
    sizes = []
    for rank in (0, 1):  # 11 samples over 2 ranks: padded to 12, 6 per rank
        sampler = ResumableBatchSampler(11, 4, shuffle=True, seed=0, rank=rank, world_size=2, pad=True)
        loader = DataLoader(data, batch_sampler=sampler)
        assert sum(len(b) for b in sampler) == 6
        sizes.append(epoch_batch_sizes(loader, len(loader)))
    assert sizes == [[4, 2], [4, 2]]


def test_evaluate_before_fit_leaves_no_inference_tensors(tmp_path):
    from torchkiln import make_trainer

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    data = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    loader = DataLoader(data, batch_size=8)
    # channels_last makes _setup() move the parameters: inside inference_mode they would become
    # inference tensors, and the first backward would fail.
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), epochs=1,
                      progress=False, channels_last=True, device="cpu")
    trainer.evaluate(loader)
    assert not any(p.is_inference() for p in model.parameters())
    trainer.fit(loader)
    model2 = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    trainer = make_trainer(model2, torch.optim.SGD(model2.parameters(), lr=0.1), nn.CrossEntropyLoss(), epochs=1,
                      progress=False, channels_last=True, device="cpu")
    assert trainer.predict(loader).shape == (32, 10)  # predict first, then train
    assert not any(p.is_inference() for p in model2.parameters())
    trainer.fit(loader)


# ------------------------------------------------------------------------------------------
# 8 and 10. smaller things
# ------------------------------------------------------------------------------------------
def test_report_tells_an_early_stop_and_draws_the_per_step_lr(tmp_path, kiln):
    from torchkiln.commands.report import load_run, report

    cfg = small_config(tmp_path, scheduler={"type": "OneCycleLR", "args": {"max_lr": 0.02}},
                       trainer={"epochs": 8, "monitor": "val/loss", "early_stop": 1, "min_delta": 10.0},
                       logging={"progress": False, "plots": False, "tensorboard": False, "every_n_steps": 1})
    kiln("train", "-c", str(write_config(tmp_path, cfg)), cwd=tmp_path, check=True)
    run_dir = next((tmp_path / "runs" / "t").iterdir())
    run = load_run(run_dir)
    assert run.status == "stopped early (epoch 2)"
    assert len(run.steps) == run.summary["global_step"] > 2 and all("lr/group0" in r for r in run.steps)
    result = report([run_dir], tmp_path / "rep")
    assert "stopped early (epoch 2)" in result["text"]


def test_exported_model_json_is_enough_to_rebuild_the_model(tmp_path, kiln):
    cfg = small_config(tmp_path, model={"type": "MLP", "args": {"hidden": [16]}},
                       data={"transforms": {"eval": [{"type": "ToDtype", "args": {"dtype": "float32"}}]}},
                       trainer={"epochs": 1}, logging={"progress": False, "plots": False, "tensorboard": False})
    kiln("train", "-c", str(write_config(tmp_path, cfg)), cwd=tmp_path, check=True)
    run_dir = next((tmp_path / "runs" / "t").iterdir())
    kiln("export", str(run_dir), cwd=tmp_path, check=True)
    info = json.loads((run_dir / "export" / "model.json").read_text())
    assert info["num_classes"] == 10  # inferred from the data, not in the config
    assert info["preprocessing"]["eval_transforms"][0]["type"] == "ToDtype"
    from safetensors.torch import load_file

    from torchkiln.models.small import MLP

    model = MLP(**{**info["model"]["args"], "num_classes": info["num_classes"]})
    model.load_state_dict(load_file(run_dir / "export" / "model.safetensors"))


def test_the_api_writes_a_whole_run_directory_in_one_call(tmp_path):
    from torchkiln import make_trainer, run_loggers
    from torchkiln.metrics import build_metrics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    loader = DataLoader(data, batch_size=16)
    run_dir = tmp_path / "api-run"
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), epochs=2,
                      metrics=build_metrics(["accuracy"], num_classes=10), progress=False, device="cpu",
                      run_dir=run_dir, loggers=run_loggers(run_dir, model))
    trainer.fit(loader, loader)
    for name in ("metrics.csv", "metrics.jsonl", "train.log", "summary.json", "plots/curves.png",
                 "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "summary.json").read_text())["epochs_completed"] == 2
    assert "done: best val/accuracy" in (run_dir / "train.log").read_text()


def test_half_precision_on_a_cpu_without_its_units_warns(caplog):
    from torchkiln.engine import step

    with caplog.at_level("WARNING", logger="torchkiln"):
        step._warn_slow_cpu_precision("fp16")
    if "amx_fp16" not in step._cpu_flags():
        assert "fp16 on this CPU" in caplog.text


def test_a_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys; sys.argv=['kiln', 'config', 'schema']; from torchkiln.cli import main; sys.exit(main())")
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | true", shell=True, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_threads_setting_reaches_torch(tmp_path):
    from torchkiln.commands.train import build_parts

    before = torch.get_num_threads()
    try:
        build_parts(resolve(small_config(tmp_path, trainer={"threads": 1})), progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("section, key", [
    ({"model": {"type": "MLP", "args": {"in_features": 10, "num_classes": 10}}}, "model"),
    ({"loss": {"type": "MSELoss"}}, "loss"),
])
def test_a_model_or_loss_that_does_not_fit_the_data_is_one_line_before_the_run(tmp_path, section, key, kiln):
    path = write_config(tmp_path, small_config(tmp_path, **section))
    proc = kiln("train", "-c", str(path), cwd=tmp_path)
    _one_line_error(proc, f"{path}: {key}: one batch of the training data does not go through")
    assert not (tmp_path / "runs").exists()


def test_the_probe_leaves_the_run_as_it_would_have_been(tmp_path):
    """Same weights after training with and without the one-batch probe (it restores the RNGs and
    moves no BatchNorm statistics)."""
    from torchkiln import probe as probe_module
    from torchkiln.commands.train import build_parts

    cfg = resolve(small_config(tmp_path, model={"type": "SmallCNN", "args": {"num_classes": 10}},
                               data={"transforms": {"train": [{"type": "RandomAffine", "args": {"degrees": 15}}]}},
                               trainer={"epochs": 1}))
    weights = []
    for skip in (False, True):
        real = probe_module.probe
        if skip:
            probe_module.probe = lambda *a, **k: None
        try:
            trainer, loaders, _ = build_parts(cfg, progress=False)
        finally:
            probe_module.probe = real
        trainer.fit(loaders["train"], loaders["val"])
        weights.append({k: v.clone() for k, v in trainer.raw_model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_config_callbacks_by_name_are_checked_before_the_run(tmp_path, cli):
    """`callbacks:` by registered name: a second early-stop rule stops the run; a monitored name the
    run will not log, or a class that is not a Callback, is refused before any run directory exists."""
    from conftest import small_config, write_config

    base = small_config(tmp_path, trainer={"epochs": 6, "monitor": "val/accuracy"},
                        optimizer={"type": "SGD", "args": {"lr": 0.0}})  # nothing changes after epoch 1
    cfg = write_config(tmp_path, {**base, "callbacks": [{"type": "EarlyStopping", "args": {"patience": 2,
                                                                                           "monitor": "val/loss"}}]})
    code, out, err = cli("train", "-c", str(cfg))
    assert code == 0, err
    (run,) = (tmp_path / "runs" / "t").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_early"] and summary["epochs_completed"] == 3
    for bad, message in (({"type": "EarlyStopping", "args": {"patience": 2, "monitor": "val/los"}},
                          "EarlyStopping(monitor='val/los'): it will not be logged; did you mean 'val/loss'?"),
                         ({"type": "torch.nn:Linear", "args": {"in_features": 1, "out_features": 1}},
                          "callbacks.0.type: torch.nn:Linear built a Linear, not a torchkiln.Callback")):
        (tmp_path / "runs2").mkdir(exist_ok=True)
        cfg = write_config(tmp_path, {**base, "output_dir": str(tmp_path / "runs2"), "callbacks": [bad]})
        code, out, err = cli("train", "-c", str(cfg))
        assert code == 2 and message in err, err
        assert not list((tmp_path / "runs2").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_engine_errors_name_their_parameter_and_the_cli_names_the_config_key(tmp_path, cli):
    """The engine speaks of its own parameters; the command turns them into the config's key path."""
    from conftest import small_config, write_config
    from torchkiln import make_trainer
    from torchkiln.errors import SettingError

    model = torch.nn.Linear(4, 2)
    with pytest.raises(SettingError, match=r"^device: CUDA was asked for"):
        make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cuda")
    with pytest.raises(SettingError, match=r"^grad_clip_mode: expected norm or value"):
        make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), grad_clip_mode="l2")
    from torchkiln.callbacks.checkpointing import Checkpointing

    with pytest.raises(SettingError, match=r"^callbacks: a Checkpointing callback is the checkpoint policy"):
        make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[Checkpointing(tmp_path)])
    cfg = write_config(tmp_path, small_config(tmp_path))
    code, _, err = cli("train", "-c", str(cfg), "trainer.device=cuda")
    assert code == 2 and f"{cfg}: trainer.device: CUDA was asked for but this machine has none" in err, err
    assert not (tmp_path / "runs").exists()


def test_nll_loss_on_raw_scores_is_flagged_before_the_run(caplog):
    """A config ported from a template whose model ended in log_softmax: NLLLoss on logits trains
    toward a negative loss. The pre-run probe says so; on log-probabilities it says nothing."""
    from torchkiln.probe import probe
    from torchkiln.tasks.base import ClassificationTask

    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
    torch.manual_seed(0)
    logits = nn.Linear(4, 3)
    with caplog.at_level("WARNING", logger="torchkiln"):
        probe(logits, nn.NLLLoss(), ClassificationTask(), loader)
    assert any("NLLLoss expects log-probabilities" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="torchkiln"):
        probe(nn.Sequential(logits, nn.LogSoftmax(1)), nn.NLLLoss(), ClassificationTask(), loader)
        probe(logits, nn.CrossEntropyLoss(), ClassificationTask(), loader)
    assert not caplog.records
