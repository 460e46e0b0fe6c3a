"""Does training work: `kiln train --fast-dev-run`, `--overfit-batches` and `kiln lr-find`, through
the real `kiln` (a fresh process where the issue names the path), on digits."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from conftest import ROOT, kiln, small_config, write_config
from torchkiln import fingerprint, make_trainer
from torchkiln.engine.lr_range import range_test, steepest, valley

CHECKS = ["build", "train", "run files", "checkpoint", "resume", "test", "checks"]


def test_fast_dev_run_goes_through_everything_and_leaves_nothing(tmp_path):
    cfg = small_config(tmp_path, model={"type": "SmallCNN", "args": {"num_classes": 10, "width": 8}},
                       data={"mixup": {"mixup_alpha": 0.2}},
                       trainer={"epochs": 5, "monitor": "val/accuracy", "ema": {"decay": 0.9}},
                       callbacks=[{"type": "EarlyStopping", "args": {"patience": 3}}])
    proc = kiln("train", "--fast-dev-run", "3", "-c", str(write_config(tmp_path, cfg)))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    tmp = Path(re.search(r"in (\S+) \(removed afterwards\)", lines[0]).group(1))
    assert not tmp.exists() and not (tmp_path / "runs").exists()
    for name in CHECKS:
        assert any(re.match(rf"\s+ok\s+{name}\s.*\(\d+\.\d\d s\)$", line) for line in lines), (name, proc.stdout)
    text = proc.stdout
    assert "3 optimizer step(s)" in text and "6 steps in all" in text  # N batches, then resumed for N more
    assert "(ema)" in text  # the checkpoint's inference weights are the EMA's
    assert re.search(r"fast-dev-run passed: 7/7 checks in [\d.]+ s$", lines[-1])


def test_fast_dev_run_fails_on_a_finding_and_overfit_gives_a_verdict(tmp_path, cli, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))  # kiln_faults, as the config names it
    bad = write_config(tmp_path, small_config(tmp_path, model={"type": "kiln_faults:UnusedParamMLP", "args": {}}), "bad.yaml")
    code, out, _ = cli("train", "--fast-dev-run", "-c", str(bad))
    assert code == 1
    assert re.search(r"FAIL\s+checks\s+2 trainable parameter\(s\) received no gradient: spare.weight, spare.bias",
                     out)
    assert "fast-dev-run FAILED: 6/7 checks" in out
    good = write_config(tmp_path, small_config(tmp_path, data={"batch_size": 32}))
    code, out, _ = cli("train", "--overfit-batches", "1", "-c", str(good), "trainer.epochs=30")
    last = out.strip().splitlines()[-1]
    assert code == 0 and re.match(r"overfit PASS: the loss fell from [\d.]+ to [\d.e-]+, [\d.]+% of its start"
                                  r" \(threshold 10%\), val/accuracy 1$", last), out
    run = next((tmp_path / "runs" / "t-overfit").iterdir())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["shuffle"] is False and saved["scheduler"] is None and saved["trainer"]["epochs"] == 30
    code, out, _ = cli("train", "--overfit-batches", "2", "-c", str(good), "trainer.epochs=2",
                       "optimizer.args.lr=0.0")
    assert code == 1 and out.strip().splitlines()[-1].startswith("overfit FAIL: the loss fell from")
    code, _, err = cli("train", "--overfit-batches", "0", "-c", str(good))
    assert code == 2 and err == "error: --overfit-batches: expected a number >= 1; found 0\n"


def test_lr_find_suggests_plots_and_applies(tmp_path):
    cfg = small_config(tmp_path, scheduler={"type": "OneCycleLR", "args": {"max_lr": 0.05}})
    path = write_config(tmp_path, cfg)
    proc = kiln("lr-find", "-c", str(path), "-o", str(tmp_path / "lr"), "--apply", str(tmp_path / "tuned.yaml"),
                "--steps", "30", "--start", "1e-5", "--end", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    found = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert float(out[-1]) == pytest.approx(found["valley"], rel=1e-2)  # the last line is the suggestion
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 10_000
    assert found["steepest"] is not None and found["config_lr"] == 0.05
    assert any("valley (fastai)" in line and "suggested" in line for line in out)
    assert any("steepest descent" in line for line in out)
    assert len(found["lrs"]) <= 30 and found["lrs"][0] == pytest.approx(1e-5)
    tuned = yaml.safe_load((tmp_path / "tuned.yaml").read_text())
    assert tuned["optimizer"]["args"]["lr"] == tuned["scheduler"]["args"]["max_lr"] == float(out[-1])


def test_lr_find_names_its_flags_when_they_are_wrong_before_anything_runs(tmp_path):
    """--start/--end and --steps are flags, not config keys (it said `trainer.lr range`, after the
    data were built): refused before the config is even read (the one given is not there)."""
    for args, line in ((["--start", "10", "--end", "1"], "--start/--end: expected 0 < start < end; found start 10.0, end 1.0"),
                       (["--start", "0"], "--start/--end: expected 0 < start < end; found start 0.0, end 10.0"),
                       (["--steps", "2"], "--steps: expected at least 3 steps; found 2")):
        proc = kiln("lr-find", "-c", str(tmp_path / "missing.yaml"), *args, cwd=tmp_path)
        assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"error: {line}\n", "")
    assert list(tmp_path.iterdir()) == []


def test_range_test_restores_model_optimizer_and_rng():
    x, y = load_digits(return_X_y=True)
    loader = DataLoader(TensorDataset(torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)), batch_size=64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = make_trainer(model, optimizer, epochs=1, progress=False)
    trainer.fit(loader)  # the optimizer holds state now
    before = (fingerprint(model), copy.deepcopy(optimizer.state_dict()), torch.get_rng_state())
    result = range_test(trainer, loader, start=1e-4, end=100.0, steps=80)
    assert "diverged" in result.stop and len(result.lrs) < 80  # stopped early at divergence
    assert fingerprint(model) == before[0] and torch.equal(torch.get_rng_state(), before[2])
    after = optimizer.state_dict()
    assert after["param_groups"] == before[1]["param_groups"]
    assert all(torch.equal(v, before[1]["state"][i][k]) for i, s in after["state"].items() for k, v in s.items())


def test_suggestion_rules_on_a_known_curve():
    losses = [3.0, 3.0, 2.9, 2.5, 2.0, 1.5, 1.2, 1.1, 1.5, 3.0]
    assert valley(losses) == 3  # longest decreasing run: indices 0, 2..7; halfway along it
    lrs = [10 ** (k / 2) for k in range(len(losses))]
    assert steepest(lrs, losses) in (4, 5)  # the largest drop per decade, before the minimum
    assert valley([1.0, 2.0]) is None
