"""`kiln tune`: the space checked before Ray starts, a 6-trial ASHA search on digits (inspected by
several tests), a search interrupted and resumed with a trial that raises, and the missing extra."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, kiln, small_config, write_config

# Good learning rates first: ASHA's first trials at a rung set the bar the later ones must clear.
LRS = [0.01, 0.003, 1.0e-5, 3.0e-6, 3.0, 1.0e-6]
EPOCHS = 4


def tune_config(tmp_path: Path, **tune) -> dict:
    cfg = small_config(tmp_path, trainer={"epochs": EPOCHS, "monitor": "val/accuracy"},
                       logging={"progress": False, "tensorboard": False})
    cfg["tune"] = {"num_samples": 1, "searcher": "random", "max_concurrent": 2,
                   "space": {"optimizer.args.lr": {"grid": LRS}},
                   "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}, **tune}
    return cfg


def rows(search_dir: Path) -> list[dict[str, str]]:
    with open(search_dir / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def search_dir_in(out: str) -> Path:
    (line,) = [ln for ln in out.splitlines() if ln.startswith("table ")]
    return Path(line.split(" ", 1)[1]).parent


# -- before Ray: the space and the extra (in this process, fast) ------------------------------
@pytest.mark.parametrize("space, message", [
    ({"trainer.epoch": {"choice": [2, 3]}}, "tune.space.trainer.epoch: no key 'epoch' in trainer; did you mean 'epochs'?"),
    ({"optimizer.args.lrr": {"loguniform": [1.0e-4, 1.0e-1]}}, "unknown argument for Adam; did you mean 'lr'?"),
    ({"optimizr.args.lr": {"loguniform": [1.0e-4, 1.0e-1]}}, "no key 'optimizr' in the top level; did you mean 'optimizer'?"),
    ({"data.batch_size": {"choice": [32, 0]}}, "tune.space.data.batch_size: the value 0 is refused: data.batch_size:"),
    ({"scheduler.args.max_lr": {"uniform": [0.1, 0.2]}}, "scheduler is not set in the config"),
    ({"optimizer.args.lr": {"logunifrom": [1.0e-4, 1.0e-1]}}, "unknown distribution 'logunifrom'; did you mean 'loguniform'?"),
    ({"optimizer.args.lr": {"loguniform": [0.1, 0.001]}}, "loguniform: low must be below high"),
    ({"metrics.5": {"choice": ["accuracy"]}}, "'5' is not an index of metrics (a list of 2)"),
])
def test_a_bad_space_is_one_line_before_ray_starts(cli, tmp_path, space, message):
    cfg = tune_config(tmp_path, space=space)
    code, out, err = cli("tune", "-c", str(write_config(tmp_path, cfg)))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert not (tmp_path / "runs").exists()  # nothing written, no Ray


def test_tune_metric_must_be_logged(cli, tmp_path):
    cfg = tune_config(tmp_path, metric="val/acuracy")
    code, out, err = cli("tune", "-c", str(write_config(tmp_path, cfg)))
    assert code == 2 and "tune.metric: 'val/acuracy' will not be logged; did you mean 'val/accuracy'?" in err, err


def test_grid_needs_the_random_searcher(cli, tmp_path):
    cfg = tune_config(tmp_path, searcher="optuna")
    code, out, err = cli("tune", "-c", str(write_config(tmp_path, cfg)))
    assert code == 2 and "tune.space.optimizer.args.lr: grid is not a distribution Optuna samples" in err, err


def test_without_the_extra_kiln_tune_names_it(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code, out, err = cli("tune", "-c", str(write_config(tmp_path, tune_config(tmp_path))))
    assert code == 2 and err.strip().count("\n") == 0 and "pip install 'torchkiln[tune]'" in err, err


def test_a_config_without_a_tune_section_is_refused(cli, tmp_path):
    code, out, err = cli("tune", "-c", str(write_config(tmp_path, small_config(tmp_path))))
    assert code == 2 and "tune: no such section" in err, err


# -- the 6-trial search -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """6 learning rates on digits, 4 epochs, ASHA (grace 1, factor 2), 2 trials at a time."""
    home = tmp_path_factory.mktemp("tune")
    path = write_config(home, tune_config(home))
    started = time.perf_counter()
    proc = kiln("tune", "-c", str(path), cwd=home, timeout=900)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"6-trial search: {wall:.1f} s")
    return home, search_dir_in(proc.stdout), proc.stdout


@pytest.mark.slow
def test_asha_stops_the_weak_trials_early(search):
    home, search_dir, out = search
    table = rows(search_dir)
    assert len(table) == 6 and {float(r["optimizer.args.lr"]) for r in table} == set(LRS)
    stopped = [r for r in table if r["status"] == "stopped early"]
    assert stopped and all(int(r["epochs"]) < EPOCHS for r in stopped), table
    assert any(r["status"] == "completed" and int(r["epochs"]) == EPOCHS for r in table), table
    lrs_stopped = {float(r["optimizer.args.lr"]) for r in stopped}
    assert lrs_stopped & {1.0e-5, 3.0e-6, 1.0e-6}, table  # too small to learn in an epoch
    assert "best val/accuracy" in out and "stopped early" in out  # the table is printed too
    assert search_dir.is_absolute() and search_dir.parent == home / "runs" / "t"
    assert search_dir.name.startswith("tune-")


@pytest.mark.slow
def test_each_trial_is_an_ordinary_run_that_ended_cleanly(search):
    home, search_dir, _ = search
    for r in rows(search_dir):
        run = search_dir / "trials" / r["trial"]
        for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
            assert (run / name).is_file(), (r, name)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["epochs_completed"] == int(r["epochs"]), (r, summary)
        assert abs(summary["best"] - float(r["best val/accuracy"])) < 1e-6
        if r["status"] == "stopped early":
            assert summary["stopped_early"] and "the search stopped this trial" in (run / "train.log").read_text()
    ray_checkpoints = list((search_dir / "ray").glob("*/checkpoint_*/last.ckpt"))
    assert ray_checkpoints  # every epoch's checkpoint was given to Ray
    assert (search_dir / "plots" / "val_accuracy.png").stat().st_size > 10_000


@pytest.mark.slow
def test_best_yaml_reruns_to_the_reported_value(search):
    home, search_dir, _ = search
    table = rows(search_dir)
    best = max(table, key=lambda r: float(r["best val/accuracy"] or "nan"))
    data = yaml.safe_load((search_dir / "best.yaml").read_text())
    assert data["optimizer"]["args"]["lr"] == float(best["optimizer.args.lr"]) and data.get("tune") is None
    assert all(c["type"] != "TuneReport" for c in data["callbacks"])
    kiln("train", "-q", "-c", str(search_dir / "best.yaml"), cwd=home, check=True)
    (rerun,) = [p for p in (home / "runs" / "t").iterdir() if not p.name.startswith("tune-")]
    assert json.loads((rerun / "summary.json").read_text())["best"] == pytest.approx(
        float(best["best val/accuracy"]), abs=1e-6)


# -- interrupted, resumed, and a trial that raises --------------------------------------------
@pytest.mark.slow
def test_an_interrupted_search_resumes_and_a_failing_trial_is_an_error(tmp_path):
    cfg = tune_config(tmp_path, scheduler="none", space={"model.args.hidden": {"grid": [[32], [-4], [16]]}})
    cfg["data"]["batch_size"] = 16
    path = write_config(tmp_path, cfg)
    env = {"PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "torchkiln", "tune", "-c", str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, **env})
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # interrupt once a trial has an epoch
        if any(len(p.read_text().splitlines()) >= 2 for p in tmp_path.glob("runs/t/tune-*/trials/*/metrics.csv")):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "kiln tune --resume" in err, (out[-2000:], err[-3000:])
    (search_dir,) = tmp_path.glob("runs/t/tune-*")
    before = {r["trial"]: r["status"] for r in rows(search_dir)}
    assert "unfinished" in before.values(), before
    resumed = kiln("tune", "--resume", str(search_dir), cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = {r["model.args.hidden"]: r for r in rows(search_dir)}
    assert set(table) == {"[32]", "[-4]", "[16]"}, table
    assert table["[-4]"]["status"] == "error" and "negative" in table["[-4]"]["reason"], table
    assert table["[32]"]["status"] == table["[16]"]["status"] == "completed", table
    assert "unfinished" not in {r["status"] for r in table.values()}
    assert "error" not in [s for t, s in before.items() if t != table["[-4]"]["trial"]]


def test_the_readme_search_passes_the_checks_on_the_default_config():
    import re

    from torchkiln.config.load import default_config_path, read_file, resolve
    from torchkiln.tune.space import check_space

    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if b.startswith("tune:")]
    data = {**read_file(default_config_path()), **yaml.safe_load(block)}
    space = check_space(resolve(data, "README"), "README")
    assert set(space) == {"optimizer.args.lr", "data.batch_size", "model.args.width", "loss.args.label_smoothing"}
