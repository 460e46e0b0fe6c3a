"""`kiln tune`: the space and the address checked before Ray starts; a 6-trial ASHA search on
digits with a 7th trial that raises (one local Ray, inspected by several tests); an Optuna search
on a Ray cluster started here (`ray start --head`), interrupted while its trials are held after
their first checkpoint, and resumed from those checkpoints; the missing extra."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, kiln, small_config, write_config

# Good learning rates first: ASHA's first trials at a rung set the bar the later ones must clear.
LRS = [0.01, 0.003, 1.0e-5, 3.0e-6, 3.0, 1.0e-6]
BAD_LR = -1.0  # passes the space checks; Adam refuses it when the trial builds its optimizer
EPOCHS = 2  # ASHA's rungs: epoch 1 (grace) and 2 (max_t)


def tune_config(tmp_path: Path, **tune) -> dict:
    cfg = small_config(tmp_path, trainer={"epochs": EPOCHS, "monitor": "val/accuracy"},
                       logging={"progress": False, "tensorboard": False})
    cfg["tune"] = {"num_samples": 1, "searcher": "random", "max_concurrent": 2,
                   "space": {"optimizer.args.lr": {"grid": [*LRS, BAD_LR]}},
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
    assert not (tmp_path / "runs").exists()  # refused before Ray starts


def test_without_the_extra_kiln_tune_names_it(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code, out, err = cli("tune", "-c", str(write_config(tmp_path, tune_config(tmp_path))))
    assert code == 2 and err.strip().count("\n") == 0 and "pip install 'torchkiln[tune]'" in err, err


def test_a_config_without_a_tune_section_is_refused(cli, tmp_path):
    code, out, err = cli("tune", "-c", str(write_config(tmp_path, small_config(tmp_path))))
    assert code == 2 and "tune: no such section" in err, err


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:{port}", "--address 127.0.0.1:{port}: no Ray cluster there"),
    ("ray://127.0.0.1:{port}", "--address ray://127.0.0.1:{port}: no Ray cluster there"),
    ("localhost", "--address localhost: not auto, HOST:PORT or ray://HOST:PORT"),
])
def test_a_bad_address_is_one_line_before_anything_is_written(cli, tmp_path, address, message):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = cli("tune", "-c", str(write_config(tmp_path, tune_config(tmp_path))),
                         "--address", address.format(port=port))
    assert code == 2 and len(err.strip().splitlines()) == 1 and message.format(port=port) in err, err
    assert not (tmp_path / "runs").exists() and "ray" not in sys.modules  # refused by the probe, before Ray


# -- the 6-trial search (+1 that raises), on a local Ray ----------------------------------------
@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """6 learning rates on digits and one Adam refuses, 2 epochs, ASHA (grace 1, factor 2), 2 at a time."""
    home = tmp_path_factory.mktemp("tune")
    path = write_config(home, tune_config(home))
    started = time.perf_counter()
    proc = kiln("tune", "-c", str(path), cwd=home, timeout=900)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"7-trial search: {wall:.1f} s")
    return home, search_dir_in(proc.stdout), proc.stdout, proc.stderr


@pytest.mark.slow
def test_asha_stops_the_weak_trials_early(search):
    home, search_dir, out, err = search
    table = [r for r in rows(search_dir) if float(r["optimizer.args.lr"]) != BAD_LR]
    assert len(table) == 6 and {float(r["optimizer.args.lr"]) for r in table} == set(LRS)
    stopped = [r for r in table if r["status"] == "stopped early"]
    assert stopped and all(int(r["epochs"]) < EPOCHS for r in stopped), table
    assert any(r["status"] == "completed" and int(r["epochs"]) == EPOCHS for r in table), table
    lrs_stopped = {float(r["optimizer.args.lr"]) for r in stopped}
    assert lrs_stopped & {1.0e-5, 3.0e-6, 1.0e-6}, table  # too small to learn in an epoch
    assert "best val/accuracy" in out and "stopped early" in out  # the table is printed too
    assert search_dir.is_absolute() and search_dir.parent == home / "runs" / "t"
    assert search_dir.name.startswith("tune-")
    # Ray's console is quiet: no experiment box, no token-auth notice; kiln's own table is there
    assert "Configuration for experiment" not in out + err and "Token authentication" not in out + err, err


@pytest.mark.slow
def test_a_trial_that_raises_is_an_error_row_and_the_search_goes_on(search):
    home, search_dir, out, _ = search
    (bad,) = [r for r in rows(search_dir) if float(r["optimizer.args.lr"]) == BAD_LR]
    assert bad["status"] == "error" and bad["epochs"] == "0" and "learning rate" in bad["reason"], bad
    assert "\n" not in bad["reason"]
    assert (search_dir / "trials" / bad["trial"] / "error.txt").read_text().strip() == bad["reason"]


@pytest.mark.slow
def test_each_trial_is_an_ordinary_run_that_ended_cleanly(search):
    home, search_dir, _, _ = search
    for r in rows(search_dir):
        if r["status"] == "error":
            continue
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
def test_best_yaml_reruns_to_the_reported_value(search, cli):
    import torch

    home, search_dir, _, _ = search
    table = rows(search_dir)
    best = max(table, key=lambda r: float(r["best val/accuracy"] or "nan"))
    data = yaml.safe_load((search_dir / "best.yaml").read_text())
    assert data["optimizer"]["args"]["lr"] == float(best["optimizer.args.lr"]) and data.get("tune") is None
    assert all(c["type"] != "TuneReport" for c in data["callbacks"])
    threads = torch.get_num_threads()
    try:  # `kiln train -c best.yaml`, in this process (best.yaml sets trainer.threads)
        code, _, err = cli("train", "-q", "-c", str(search_dir / "best.yaml"))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    (rerun,) = [p for p in (home / "runs" / "t").iterdir() if not p.name.startswith("tune-")]
    assert json.loads((rerun / "summary.json").read_text())["best"] == pytest.approx(
        float(best["best val/accuracy"]), abs=1e-6)


# -- Optuna on a Ray cluster: interrupted with its trials held after their first checkpoint, resumed
HOLD = '''
import os, time
from pathlib import Path
from torchkiln.engine.callbacks import Callback


class HoldSecondEpoch(Callback):
    """Holds a trial at the start of its second epoch, after its first epoch's checkpoint went to
    Ray, until `folder`/go exists (the test writes it after the interrupt: the resumed run passes)."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def on_epoch_start(self, trainer, epoch):
        if epoch == 1 and not (self.folder / "go").exists():
            (self.folder / f"held-{os.getpid()}").touch()
            deadline = time.time() + 120
            while not (self.folder / "go").exists() and time.time() < deadline:
                time.sleep(0.1)
'''
LR_RANGE = (1.0e-3, 3.0e-2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Ray cluster (`ray start --head --block`, ended by its own process id), with token
    auth: its address, and the environment that joins it (its workers import hold.py from `hooks`).
    A short temp dir: Ray's socket paths must fit in 107 characters."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "hold.py").write_text(HOLD)
    temp = tempfile.mkdtemp(prefix="kr", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{hooks}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": uuid.uuid4().hex, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_prestart_worker_first_driver": "0"}
    ray = Path(sys.executable).with_name("ray")
    started = time.perf_counter()
    head = subprocess.Popen([str(ray), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--num-gpus", "0", "--include-dashboard", "false", "--node-ip-address", "127.0.0.1",
                             "--temp-dir", temp], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and head.poll() is None and not list(Path(temp).glob("session_*/logs/raylet.out")):
        time.sleep(0.2)
    assert head.poll() is None, head.stderr.read()[-3000:]
    time.sleep(1.0)
    print(f"ray start --head: {time.perf_counter() - started:.1f} s")
    yield f"127.0.0.1:{port}", env
    head.send_signal(signal.SIGINT)  # `ray start --block` ends its processes on Ctrl-C
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)  # its own process group, started above
        head.wait()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def resumed(cluster, tmp_path_factory):
    """2 Optuna trials on the cluster, held at epoch 2's start; Ctrl-C; `kiln tune --resume`."""
    address, env = cluster
    home = tmp_path_factory.mktemp("resume")
    cfg = tune_config(home, searcher="optuna", num_samples=2, scheduler="none",
                      space={"optimizer.args.lr": {"loguniform": list(LR_RANGE)}})
    cfg["callbacks"] = [{"type": "hold:HoldSecondEpoch", "args": {"folder": str(home)}}]
    path = write_config(home, cfg)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "torchkiln", "tune", "-c", str(path), "--address", address],
                            cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(home.glob("held-*"))) < 2:
        time.sleep(0.2)
    assert len(list(home.glob("held-*"))) == 2, "both trials are held after their first checkpoint"
    t1 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    t2 = time.perf_counter()
    (search_dir,) = home.glob("runs/t/tune-*")
    before = rows(search_dir)
    (home / "go").touch()
    again = subprocess.run([sys.executable, "-m", "torchkiln", "tune", "--resume", str(search_dir), "--address",
                            address], cwd=home, capture_output=True, text=True, env=env, timeout=600)
    print(f"to both held {t1 - t0:.1f} s, Ctrl-C to exit {t2 - t1:.1f} s, resume {time.perf_counter() - t2:.1f} s")
    return search_dir, (proc.returncode, out, err), before, again


@pytest.mark.slow
def test_an_interrupted_search_ends_130_with_the_resume_hint(resumed):
    search_dir, (code, out, err), before, _ = resumed
    assert code == 130 and f"kiln tune --resume {search_dir}" in err, (out[-2000:], err[-3000:])
    assert [r["status"] for r in before] == ["unfinished", "unfinished"], before


@pytest.mark.slow
def test_resume_restores_each_trial_from_its_own_ray_checkpoint(resumed):
    search_dir, _, before, again = resumed
    assert again.returncode == 0, again.stderr[-3000:]
    for r in rows(search_dir):
        run = search_dir / "trials" / r["trial"]
        assert r["status"] == "completed" and r["epochs"] == str(EPOCHS), r
        epochs = [row["epoch"] for row in csv.DictReader(open(run / "metrics.csv"))]
        assert epochs == ["1", "2"], epochs  # epoch 1 once: continued, not started again
        text = (run / "train.log").read_text()
        # only Ray's checkpoint of the trial (tune.get_checkpoint) makes its run resume, here at epoch 2
        assert "resumed at epoch 2, step" in text and text.count("epoch 1/2 ") == 1, text[-2000:]


@pytest.mark.slow
def test_optuna_samples_the_space_and_best_yaml_is_its_best_trial(resumed):
    search_dir, _, before, again = resumed
    assert again.returncode == 0, again.stderr[-3000:]
    table = rows(search_dir)
    lrs = [float(r["optimizer.args.lr"]) for r in table]
    assert len(set(lrs)) == 2 and all(LR_RANGE[0] <= lr <= LR_RANGE[1] for lr in lrs), lrs
    assert {r["trial"]: r["optimizer.args.lr"] for r in table} == {r["trial"]: r["optimizer.args.lr"] for r in before}
    best = max(table, key=lambda r: float(r["best val/accuracy"]))
    assert yaml.safe_load((search_dir / "best.yaml").read_text())["optimizer"]["args"]["lr"] == float(
        best["optimizer.args.lr"])


def test_the_readme_search_passes_the_checks_on_the_default_config():
    import re

    from torchkiln.config.load import default_config_path, read_file, resolve
    from torchkiln.tune.space import check_space

    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if b.startswith("tune:")]
    data = {**read_file(default_config_path()), **yaml.safe_load(block)}
    space = check_space(resolve(data, "README"), "README")
    assert set(space) == {"optimizer.args.lr", "data.batch_size", "model.args.width", "loss.args.label_smoothing"}
