"""DDP on CPU (Gloo, 2 processes): same results as one process, rank-0 duties, resume, failures."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import ROOT, kiln, small_config, write_config
from ranks import free_port, torchrun_rank, two_ranks
from torchkiln import make_trainer
from torchkiln.commands.train import train
from torchkiln.config.load import resolve
from torchkiln.data.loaders import ResumableBatchSampler
from torchkiln.engine.checkpoint import load_checkpoint

PER_PROCESS_BATCH = 32


def _config(tmp_path: Path, name: str, batch: int, **trainer) -> dict:
    # SGD: its update is linear in the gradient, so float rounding (a mean over 64 samples versus
    # the mean of two means over 32) stays near 1e-7 instead of being amplified as Adam does.
    return small_config(
        tmp_path, name=name,
        data={"batch_size": batch, "shuffle": False, "drop_last": True},
        optimizer={"type": "SGD", "args": {"lr": 0.1, "momentum": 0.9}},
        trainer={"epochs": 2, "monitor": "val/accuracy", "checkpoint_every_steps": 13, **trainer},
    )


def _rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items() if not k.startswith("time/")} for r in csv.DictReader(f)]


def _only_run(root: Path) -> Path:
    runs = list(root.iterdir())
    assert len(runs) == 1, runs
    return runs[0]


# ------------------------------------------------------------------------------------------
# the sampler (fast)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True])
def test_global_batch_k_holds_the_samples_of_one_process_batch_k(shuffle):
    n, b, world = 101, 4, 2
    single = list(ResumableBatchSampler(n, b * world, shuffle=shuffle, seed=3, drop_last=True))
    ranks = [ResumableBatchSampler(n, b, shuffle=shuffle, seed=3, drop_last=True, rank=r, world_size=world)
             for r in range(world)]
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == len(ranks[1])  # no rank waits
    for k, batch in enumerate(single):
        assert sorted(per_rank[0][k] + per_rank[1][k]) == sorted(batch)
    # Without drop_last the odd sample count is padded so both ranks still take equal steps.
    padded = [list(ResumableBatchSampler(n, b, shuffle=shuffle, seed=3, rank=r, world_size=world))
              for r in range(world)]
    assert [len(p) for p in padded] == [13, 13]
    assert sorted({i for p in padded for batch in p for i in batch}) == list(range(n))


def test_evaluation_shards_cover_every_sample_exactly_once():
    n, world = 101, 2
    shards = [ResumableBatchSampler(n, 8, shuffle=False, seed=0, rank=r, world_size=world, pad=False)
              for r in range(world)]
    seen = [i for s in shards for batch in s for i in batch]
    assert sorted(seen) == list(range(n))  # no duplicate counted, none missing
    assert [len(list(s)) for s in shards] == [len(s) for s in shards] == [7, 7]


def test_worker_errors_print_each_distinct_line_once_naming_ranks_only_when_they_differ(tmp_path, monkeypatch, capsys):
    """What `kiln train --devices N` prints of its workers' user errors (errors.report/worker_errors)."""
    from torchkiln.errors import WORKER_ERRORS_ENV, ConfigError, report, worker_errors

    monkeypatch.setenv(WORKER_ERRORS_ENV, str(tmp_path))
    for rank, msg in ((0, "data.root: no such folder"), (1, "data.root: no such folder")):
        monkeypatch.setenv("RANK", str(rank))
        report(ConfigError(msg))
    assert capsys.readouterr().err == ""  # handed to the launcher, not printed by each rank
    assert worker_errors(tmp_path, 2) == ["error: data.root: no such folder"]
    assert worker_errors(tmp_path, 3) == ["error: rank 0, 1: data.root: no such folder"]  # rank 2 had none
    monkeypatch.setenv("RANK", "1")
    report(ConfigError("a broken file"))
    assert worker_errors(tmp_path, 2) == ["error: rank 0: data.root: no such folder", "error: rank 1: a broken file"]
    monkeypatch.delenv(WORKER_ERRORS_ENV)
    report(ConfigError("plain"))
    assert capsys.readouterr().err == "error: plain\n"


def test_a_dead_worker_is_reported_over_the_peer_errors_that_followed_it():
    """The agent may see a peer's own error (exit code 2: its collective lost the dead worker) at the
    same second as the death, or earlier; the death is what `kiln train --devices N` names. Torch's
    own ProcessFailure, as the agent builds it for a worker without an error file."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from torchkiln.engine.distributed import first_death

    def failure(rank: int, code: int, at: int) -> ProcessFailure:
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="")
        f.timestamp = at
        return f

    killed = failure(1, -signal.SIGKILL, 1001)
    assert first_death({0: failure(0, 2, 1000), 1: killed}) == (1, killed)
    assert first_death({0: failure(0, 2, 1000), 1: failure(1, 2, 1000)}) is None  # a user's error on each
    crashed = failure(0, 1, 1001)
    assert first_death({0: crashed, 1: failure(1, -signal.SIGKILL, 1001)}) == (0, crashed)  # a tie: the lower rank
    # A user's error on rank 1; rank 0, stopped by the agent before it wrote its own, is a SIGTERM
    # (or 143: a worker in fit catches the SIGTERM, checkpoints and exits 128 + 15).
    for stopped in (-signal.SIGTERM, 128 + signal.SIGTERM):
        assert first_death({0: failure(0, stopped, 1000), 1: failure(1, 2, 1000)}) is None
        assert first_death({0: failure(0, stopped, 1001), 1: killed}) == (1, killed)
    # Rank 1 stuck in a collective ignores the SIGTERM and is SIGKILLed 30 s after rank 0's error.
    assert first_death({0: failure(0, 2, 1000), 1: failure(1, -signal.SIGKILL, 1030)}) is None
    terminated = failure(1, -signal.SIGTERM, 1000)
    assert first_death({1: terminated}) == (1, terminated)  # only SIGTERMs: the first is reported


def test_dp_without_several_gpus_trains_plainly_with_a_warning(caplog):
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = torch.nn.Sequential(torch.nn.Linear(8, 3))
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, progress=False,
                      strategy="dp", device="cpu")
    with caplog.at_level(logging.WARNING, logger="torchkiln"):
        trainer.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    assert trainer.model is model
    assert "fewer than 2 GPUs" in caplog.text


def test_devices_with_dp_strategy_is_refused_before_launch(tmp_path, cli):
    cfg = write_config(tmp_path, small_config(tmp_path, trainer={"strategy": "dp"}))
    code, _, err = cli("train", "-c", str(cfg), "--devices", "2")
    assert code == 2 and "trainer.strategy" in err and "--devices" in err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# two real processes
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = write_config(tmp, _config(tmp, "two", PER_PROCESS_BATCH))
    proc = kiln("train", "-c", str(cfg), "--devices", "2", cwd=tmp, timeout=240, check=True)
    return tmp, _only_run(tmp / "runs" / "two"), proc


@pytest.mark.slow
def test_two_processes_match_one_process_with_double_batch(two_process_run, tmp_path):
    _, two_dir, _ = two_process_run
    one_cfg = _config(tmp_path, "one", 2 * PER_PROCESS_BATCH)
    one_cfg["logging"] = {**one_cfg["logging"], "plots": False, "tensorboard": False}  # metrics, weights compared
    one_dir, _ = train(resolve(one_cfg, "test"), progress=False)
    one_rows, two_rows = _rows(one_dir), _rows(two_dir)
    assert [r["step"] for r in one_rows] == [r["step"] for r in two_rows]  # same steps per epoch
    for a, b in zip(one_rows, two_rows):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    one = load_checkpoint(one_dir / "checkpoints" / "last.ckpt")["model"]
    two = load_checkpoint(two_dir / "checkpoints" / "last.ckpt")["model"]
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_only_rank0_writes_one_run_directory(two_process_run):
    tmp, run_dir, proc = two_process_run
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith("tensorboard/")] == [
        "checkpoints/best.ckpt", "checkpoints/last.ckpt", "checkpoints/step-000013.ckpt",
        "checkpoints/step-000026.ckpt", "config.yaml", "metrics.csv", "metrics.jsonl",
        "plots/confusion_matrix.png", "plots/curves.png", "plots/per_class.csv", "plots/per_class_f1.png",
        "summary.json", "train.log",
    ]
    # The per-class table covers every validation sample: rank 0 gathered both ranks' shards.
    import csv

    with open(run_dir / "plots" / "per_class.csv", newline="") as f:
        support = sum(int(r["support"]) for r in csv.DictReader(f))
    assert support == 360
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    log_text = (run_dir / "train.log").read_text()
    assert "global batch size 64 = 32 per process x 2 process(es)" in log_text
    assert log_text.count("epoch 2/2") == 1
    # Rank 1 logs warnings and errors only: its info lines never reach the console.
    assert proc.stderr.count("initial-parameter fingerprint") == 1 and "[rank 1]" not in proc.stderr
    # Each rank's RNG and partial epoch sums travel in the one checkpoint rank 0 writes.
    assert len(load_checkpoint(run_dir / "checkpoints" / "step-000013.ckpt")["ranks"]) == 2


@pytest.mark.slow
def test_resume_two_processes_mid_epoch_matches_uninterrupted(two_process_run, tmp_path):
    _, run_dir, _ = two_process_run
    copy = tmp_path / "copy" / run_dir.name
    shutil.copytree(run_dir, copy)
    ckpt = copy / "checkpoints" / "step-000026.ckpt"  # epoch 2, batch 7 of 19
    assert load_checkpoint(ckpt)["loop"]["batch_in_epoch"] == 7
    # Two ranks as torchrun starts them, forked (the launcher's own path: the fixture and the kill test).
    two_ranks(torchrun_rank, free_port(), "train", "--resume", str(ckpt), "-q")
    full = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    resumed = load_checkpoint(copy / "checkpoints" / "last.ckpt")
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    # Epoch 2's train loss and metrics include both ranks' partial sums from before the stop.
    assert resumed["loop"]["history"] == full["loop"]["history"]
    assert _rows(copy) == _rows(run_dir)


@pytest.mark.slow
def test_a_one_process_run_resumes_on_two_processes_from_an_epoch_end_only(tmp_path):
    """1 -> 2 processes: an end-of-epoch checkpoint resumes (RNG restarts per rank, with a warning
    in train.log; each epoch then has the two-process step count); a mid-epoch one is refused in
    one line, since the epoch's shards would differ."""
    one_dir, _ = train(resolve(_config(tmp_path, "one", PER_PROCESS_BATCH, epochs=1), "test"), progress=False)
    first = load_checkpoint(one_dir / "checkpoints" / "last.ckpt")
    steps_one = first["loop"]["global_step"]
    assert first["ranks"] is None and first["loop"]["batch_in_epoch"] == 0
    two_ranks(torchrun_rank, free_port(), "train", "--resume", str(one_dir), "trainer.epochs=2", "-q")
    resumed = load_checkpoint(one_dir / "checkpoints" / "last.ckpt")
    assert resumed["loop"]["epoch"] == 2 and len(resumed["ranks"]) == 2
    assert resumed["loop"]["global_step"] == steps_one + steps_one // 2  # global batch 64 = 2 x 32
    assert [r["epoch"] for r in _rows(one_dir) if r.get("epoch")] == [1, 2]
    assert "resuming a 1-process checkpoint with 2 process(es)" in (one_dir / "train.log").read_text()

    mid = one_dir / "checkpoints" / "step-000013.ckpt"
    assert load_checkpoint(mid)["loop"]["batch_in_epoch"] == 13
    proc = kiln("train", "--resume", str(mid), "--devices", "2", "-q", cwd=tmp_path, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # The workers' own line is the last (the launcher adds no "resume with ... --devices 2"), and
    # both ranks' identical line is printed once.
    assert proc.stderr.count("error: ") == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "written by 1 process(es) and is resumed with 2" in last, last
    assert "end-of-epoch checkpoint" in last and "resume with: kiln" not in proc.stderr


def _rank_pid(parent: int, rank: int, old: int | None = None, wait: float = 240) -> int:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{parent}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in env and int(child) != old:
                    return int(child)
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} found")


def _wait_for_new_checkpoint(runs: Path, after_ns: int, proc: subprocess.Popen, wait: float = 240) -> None:
    deadline = time.monotonic() + wait
    while not [p for p in runs.glob("*/checkpoints/step-*.ckpt") if p.stat().st_mtime_ns > after_ns]:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint was written: " + _drain(proc)
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc")
def test_killed_worker_restarts_then_stops_the_run_with_an_error(tmp_path):
    cfg = write_config(tmp_path, _config(tmp_path, "kill", PER_PROCESS_BATCH, epochs=30, dist_timeout=30))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "torchkiln", "train", "-c", str(cfg), "--devices", "2",
                             "--max-restarts", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        runs = tmp_path / "runs" / "kill"
        _wait_for_new_checkpoint(runs, 0, proc)
        first = _rank_pid(proc.pid, 1)
        os.kill(first, signal.SIGKILL)
        # --max-restarts 1: the group restarts and resumes from the last checkpoint ...
        second = _rank_pid(proc.pid, 1, old=first)
        restarted_at = time.time_ns()
        _wait_for_new_checkpoint(runs, restarted_at, proc)
        # ... and a second death, with no restart left, ends the run with an error naming the rank.
        os.kill(second, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=90)
        assert time.monotonic() - killed_at < 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    # From the newest checkpoint when the worker died: a mid-epoch one (every 13 steps) or an
    # epoch's end (19 steps per epoch), whichever came last.
    resumed = re.search(r"resumed at epoch \d+, step (\d+) ", err)
    assert resumed and int(resumed.group(1)) % 13 * (int(resumed.group(1)) % 19) == 0, err[-3000:]
    last_line = [ln for ln in err.splitlines() if ln.startswith("error: worker")][-1]
    assert "worker rank 1" in last_line and "SIGKILL" in last_line and "after 1 restart(s)" in last_line
    assert len(list(runs.iterdir())) == 1  # the restart continued the same run directory


def _drain(proc: subprocess.Popen) -> str:
    proc.kill()
    return proc.communicate()[1][-3000:]


def _stop_worker(rank: int, world: int, out: str) -> None:
    import signal as _signal

    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from torchkiln.engine import distributed as kd
    from torchkiln.engine.settings import make_trainer
    from torchkiln.engine.state import StopRequested

    # A file rendezvous: no TCP store server thread in rank 0 to outlive the test's teardown.
    dist.init_process_group("gloo", init_method=f"file://{Path(out, 'rendezvous')}", rank=rank, world_size=world)
    agreed_at = []
    real = kd.any_rank

    def counting(signum, device):
        agreed_at.append(trainer.loop.global_step)
        return real(signum, device)

    kd.any_rank = counting
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    data = TensorDataset(torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,)))
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, world, rank, shuffle=False))
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, progress=False,
                      log_every_n_steps=4, device="cpu", train_metrics=False)
    if rank == 1:  # only rank 1 hears the signal, during its step 2
        model.register_forward_hook(
            lambda *_: trainer.request_stop(_signal.SIGTERM) if trainer.loop.global_step == 1 else None)
    stopped = None
    try:
        trainer.fit(loader)
    except StopRequested:
        stopped = trainer.loop.global_step
    Path(out, f"rank{rank}.json").write_text(json.dumps({"stopped": stopped, "agreed_at": agreed_at}))
    dist.barrier()  # neither rank tears its connections down while the other still uses them
    dist.destroy_process_group()


def test_ddp_ranks_agree_on_a_stop_only_every_log_interval(tmp_path):
    """One rank's stop request is shared at the next log interval (one all-reduce per interval, not
    per step), and every rank stops after that same step."""
    two_ranks(_stop_worker, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["stopped"] for r in results] == [4, 4]  # asked at step 2, agreed at step 4
    assert [r["agreed_at"] for r in results] == [[4], [4]]


def _unfreeze_worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from torchkiln.engine.settings import make_trainer
    from torchkiln.models.freeze import Freezer

    # A file rendezvous: no TCP store server thread in rank 0 to outlive the test's teardown.
    dist.init_process_group("gloo", init_method=f"file://{Path(out, 'rendezvous')}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    freezer = Freezer(model, ["1.weight", "1.bias"], [], unfreeze_at_epoch=2)
    frozen_before = model[1].weight.detach().clone()
    g = torch.Generator().manual_seed(1)  # each rank trains on its own shard: different gradients
    data = TensorDataset(torch.randn(128, 1, 8, 8, generator=g), torch.randint(0, 10, (128,), generator=g))
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, world, rank, shuffle=False))
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=3, progress=False,
                      device="cpu", train_metrics=False, freezer=freezer)
    trainer.fit(loader)
    torch.save({"first": model[1].weight.detach(), "head": model[3].weight.detach(),
                "moved": not torch.equal(frozen_before, model[1].weight)}, Path(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_unfreezing_keeps_ranks_in_step(tmp_path):
    """Layers frozen for the first epoch and then unfrozen are trained by every rank alike: their
    gradients are all-reduced once they train (DDP is rebuilt when the trainable set changes)."""
    two_ranks(_unfreeze_worker, str(tmp_path))
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a["moved"] and b["moved"], "the unfrozen layer did not train"
    assert torch.equal(a["head"], b["head"])
    assert torch.equal(a["first"], b["first"]), "ranks diverged on the unfrozen layer"


class _NaNOnRank1(torch.nn.Module):
    """Cross-entropy, but NaN on rank 1 at its 3rd call: only that rank sees a non-finite loss."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, logits, targets):
        import torch.distributed as dist

        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if dist.get_rank() == 1 and self.calls == 3 else loss


def _skip_worker(rank: int, world: int, out: str) -> None:
    import datetime

    import torch.distributed as dist
    from torch import nn
    from torch.utils.data.distributed import DistributedSampler

    dist.init_process_group("gloo", init_method=f"file://{Path(out, 'rendezvous')}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(rank)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, world, rank, shuffle=False))
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), _NaNOnRank1(), epochs=1,
                      progress=False, device="cpu", train_metrics=False, on_nonfinite="skip_batch")
    trainer.fit(loader)
    torch.save({"w": model[1].weight.detach(), "steps": trainer.loop.global_step}, Path(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_ranks_skip_a_batch_together_when_one_rank_has_a_nonfinite_loss(tmp_path):
    """`on_nonfinite: skip_batch` under DDP: rank 1's NaN makes both ranks skip that batch (a rank
    skipping its backward alone would pair its next all-reduce with the other's current one)."""
    two_ranks(_skip_worker, str(tmp_path))
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a["steps"] == b["steps"] == 3  # 4 batches per rank, one skipped by both
    assert torch.equal(a["w"], b["w"]) and torch.isfinite(a["w"]).all()


def _folds_worker(rank: int, world: int, out: str, cfg: dict) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(cfg.pop("port"))})
    from torchkiln.commands.kfold import train_folds
    from torchkiln.engine import distributed

    try:
        root, result = train_folds(resolve(cfg), progress=False)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"root": str(root), "folds": result["folds"]}))
    finally:
        distributed.destroy()


def test_folds_under_ddp_write_one_folder_and_one_summary(tmp_path):
    port = free_port()
    cfg = small_config(tmp_path, data={"folds": 2, "test_split": 0.0},
                       trainer={"epochs": 1, "monitor": "val/accuracy", "device": "cpu"},
                       logging={"progress": False, "plots": False, "tensorboard": False})
    cfg["port"] = port
    two_ranks(_folds_worker, str(tmp_path), cfg)
    roots = {json.loads((tmp_path / f"rank{r}.json").read_text())["root"] for r in range(2)}
    assert len(roots) == 1
    folders = list((tmp_path / "runs" / "t").iterdir())
    assert len(folders) == 1 and (folders[0] / "folds.json").is_file()
    assert sorted(p.name for p in folders[0].iterdir() if p.is_dir()) == ["fold-0", "fold-1"]
    assert all(len(list((folders[0] / f"fold-{i}").iterdir())) == 1 for i in range(2))  # one run each
