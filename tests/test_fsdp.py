"""trainer.strategy fsdp on CPU (Gloo, 2 processes), its DCP checkpoints, and SLURM's warning signal.

Parity: two FSDP optimizer steps (clipping, accumulation of 2) equal the plain loop on the
concatenated batch within 1e-6. Kill -9 and resume: the final weights and history equal the
uninterrupted run's bitwise (torch.equal). World size 2 -> 1: an end-of-epoch checkpoint resumed
on one process ends the next epoch within 1e-6 of the 2-process run; a mid-epoch one is refused in
one line. Cost: one fixture trains the file's two FSDP runs; the 2-rank runs that are not about the
launcher fork their ranks from one forkserver (ranks.two_ranks).
"""

from __future__ import annotations

import csv
import json
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

from conftest import ROOT, kiln, small_config, write_config
from ranks import free_port, torchrun_rank, two_ranks
from torchkiln.engine import dcp
from torchkiln.errors import CheckpointError

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _config(tmp: Path, name: str, **trainer) -> dict:
    return small_config(
        tmp, name=name,
        data={"batch_size": 32, "shuffle": True, "drop_last": True},
        trainer={"epochs": 2, "monitor": "val/accuracy", "strategy": "fsdp", "fsdp": {"wrap": ["Linear"]},
                 "checkpoint_every_steps": 13, "grad_clip": 1.0, **trainer},
        logging={"progress": False, "plots": False, "tensorboard": False},  # rank-0 duties: test_distributed
    )


def _popen(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torchkiln", *args], cwd=cwd, env={**ENV, **kw.pop("env", {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _run_dir(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def _parity_rank(rank: int, world: int, port: int, out: str) -> None:
    """tests/fsdp_worker.py's parity run in one of two ranks forked from the forkserver (what
    `torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py parity OUT` runs, without its
    launcher and two fresh interpreters)."""
    from torch import distributed as dist

    import fsdp_worker

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fsdp_worker.parity(out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_fsdp_steps_equal_the_single_process_reference(tmp_path):
    out = tmp_path / "parity.json"
    two_ranks(_parity_rank, free_port(), str(out))
    result = json.loads(out.read_text())
    assert result["reference_moved"] > 1e-3  # the two steps did change the weights
    for variant, diff in result["max_abs_diff"].items():  # per block; and checkpointed, kept gathered
        assert diff <= 1e-6, (variant, diff)
    # pytorch#162338: torchkiln forces SUM reductions on Gloo, so the gradient is the ranks' mean.
    assert result["gradient_ratio"]["forced_sum"] == pytest.approx(1.0, abs=1e-6)
    # bf16 gathers: close to the fp32 reference, not equal; the weights themselves stay float32.
    assert 1e-7 < result["bf16_max_abs_diff"] < 1e-3 and result["bf16_dtype"] == "torch.float32"
    assert result["loaded_state_diff"] == 0.0  # a non-FSDP checkpoint's optimizer state, sharded


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """One uninterrupted FSDP run, started as torchrun starts `kiln train` (two ranks forked from the
    test's forkserver: no launcher, no fresh interpreters), keeping its end-of-epoch-1 checkpoint
    for the resume on one process; and one `kiln train --devices 2` killed with SIGKILL after its
    first checkpoint, then resumed with --resume auto. Both start together. Every other test of the
    file reads or copies these two run directories: no test trains an FSDP run of its own."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("finds the workers through /proc")
    tmp = tmp_path_factory.mktemp("fsdp")
    full_cfg = write_config(tmp, _config(tmp / "a", "full", save_period=1), "full.yaml")
    kill_cfg = write_config(tmp, _config(tmp / "b", "kill"), "kill.yaml")
    killed = _popen("train", "-c", str(kill_cfg), "--devices", "2", "-q", cwd=tmp)
    full = two_ranks(torchrun_rank, free_port(), "train", "-c", str(full_cfg), "-q", join=False)
    deadline = time.monotonic() + 240
    while not list((tmp / "b").glob("runs/kill/*/checkpoints/step-000013.ckpt")):
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    for pid in [*_descendants(killed.pid), killed.pid]:  # both workers (own sessions) and the launcher
        os.kill(pid, signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    resumed = kiln("train", "-c", str(kill_cfg), "--resume", "auto", "--devices", "2", "-q", cwd=tmp, timeout=300)
    while not full.join(timeout=300):  # raises if a rank failed
        pass
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return tmp, _run_dir(tmp / "a" / "runs" / "full"), _run_dir(tmp / "b" / "runs" / "kill")


@pytest.mark.slow
def test_killed_and_resumed_equals_uninterrupted_bitwise(fsdp_runs):
    _, full_dir, kill_dir = fsdp_runs
    full = torch.load(full_dir / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(kill_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert full["loop"]["global_step"] == resumed["loop"]["global_step"] == 2 * 19
    assert full["model"].keys() == resumed["model"].keys()
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    assert resumed["loop"]["history"] == full["loop"]["history"]
    resumed_at = re.search(r"resumed at epoch \d, step (\d+)", (kill_dir / "train.log").read_text())
    assert resumed_at and 13 <= int(resumed_at.group(1)) < 38  # from a checkpoint before the kill
    # Every checkpoint is a .ckpt naming its own folder of two shards; nothing half-written is left.
    names = sorted(p.name for p in (kill_dir / "checkpoints").iterdir())
    assert not [n for n in names if n.endswith(".partial")]
    assert f"last.{38:06d}.dcp" in names and resumed[dcp.SHARDED]["dir"] == f"last.{38:06d}.dcp"
    assert sorted(resumed[dcp.SHARDED]["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(fsdp_runs, tmp_path, cli):
    """World size 2 -> 1: the 2-process run's end-of-epoch-1 checkpoint, resumed by `kiln train
    --devices 1` with the same global batch (64 = 2 x 32), reads the two shards of the model and of
    Adam's state into the plain model, and epoch 2 ends where the 2-process run's epoch 2 ended:
    every final weight within 1e-6 (float rounding of one mean over 64 samples against two means
    over 32; measured 8.9e-8), while epoch 2 moved them by more than 1e-2."""
    _, full_dir, _ = fsdp_runs
    copy = tmp_path / "runs" / "full" / full_dir.name
    shutil.copytree(full_dir, copy)
    start = copy / "checkpoints" / "epoch-001.ckpt"
    saved = torch.load(start, weights_only=True)
    assert saved["loop"]["global_step"] == 19 and len(saved["ranks"]) == 2
    proc = kiln("train", "data.batch_size=64", "--resume", str(start), "--devices", "1", cwd=tmp_path,
                timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming a 2-process checkpoint with 1 process(es)" in proc.stderr
    assert "resumed at epoch 2, step 19 (batch 0 of the epoch)" in proc.stderr
    two = torch.load(full_dir / "checkpoints" / "last.ckpt", weights_only=True)
    one = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)
    assert one["loop"]["global_step"] == two["loop"]["global_step"] == 38
    assert not one.get(dcp.SHARDED)  # one process shards nothing: a plain checkpoint
    diff = max(float((one["model"][k] - two["model"][k]).abs().max()) for k in two["model"])
    moved = max(float((two["model"][k] - saved["model"][k]).abs().max()) for k in two["model"])
    assert diff <= 1e-6 and moved > 1e-2, (diff, moved)
    # Adam's moments and step count came from the shards (a fresh Adam would count 19 steps).
    assert {float(s["step"]) for s in one["optimizer"]["state"].values()} == {38.0}
    for a, b in zip(one["loop"]["history"], two["loop"]["history"]):
        assert a == pytest.approx(b, abs=1e-5)
    # A mid-epoch checkpoint cannot change world size (each rank's shard of the epoch's data and its
    # partial sums are the old world's): refused in one line before anything is trained or written.
    mid = copy / "checkpoints" / "step-000013.ckpt"
    before = sorted(p.name for p in (copy / "checkpoints").iterdir())
    code, _, err = cli("train", "--resume", str(mid), "--devices", "1")
    last = err.strip().splitlines()[-1]
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert "written by 2 process(es) and is resumed with 1" in last and "end-of-epoch checkpoint" in last
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_kiln_test_and_predict_read_an_fsdp_run(fsdp_runs, tmp_path):
    """`kiln test` and `kiln predict` on the FSDP run directory read the full weights rank 0 gathered
    into best.ckpt: predict's classes are the plain model's on those weights, and test's accuracy is
    theirs against the labels."""
    from torchkiln.data.splits import dataset_labels
    from torchkiln.inference.run_data import run_split
    from torchkiln.models import MLP

    tmp, full_dir, _ = fsdp_runs
    out = tmp_path / "predictions.csv"
    tested = _popen("test", str(full_dir), "-q", cwd=tmp)  # the two commands run side by side
    predicted = _popen("predict", str(full_dir), "--input", "split:test", "--out", str(out), "-q", cwd=tmp)
    for proc in (tested, predicted):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    metrics = json.loads((full_dir / "test_metrics.json").read_text())
    assert metrics["checkpoint"] == str(full_dir / "checkpoints" / "best.ckpt")
    with open(out, newline="") as f:
        preds = [int(r["pred"]) for r in csv.DictReader(f)]
    best = torch.load(full_dir / "checkpoints" / "best.ckpt", weights_only=True)
    dataset = run_split(full_dir, full_dir / "checkpoints" / "best.ckpt", "test")
    labels = dataset_labels(dataset)
    plain = MLP(num_classes=10, hidden=[32])
    plain.load_state_dict(best["model"])
    with torch.no_grad():
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        assert preds == plain.eval()(x).argmax(1).tolist()
    assert len(preds) == len(labels) == metrics["samples"]
    accuracy = sum(int(p == t) for p, t in zip(preds, labels)) / len(labels)
    assert metrics["test/accuracy"] == pytest.approx(accuracy, abs=1e-6) and accuracy > 0.5


@pytest.mark.slow
def test_full_state_export_loads_into_a_plain_model(fsdp_runs, tmp_path, cli):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from torchkiln.models import MLP

    _, full_dir, _ = fsdp_runs
    code, _, err = cli("export", str(full_dir), "-o", str(tmp_path / "export"))  # in this process: ~6 s less
    assert code == 0, err[-3000:]
    weights = load_file(tmp_path / "export" / "model.safetensors")
    args = json.loads((tmp_path / "export" / "model.json").read_text())["model"]["args"]
    plain = MLP(**{k: v for k, v in args.items() if k in ("num_classes", "hidden", "in_features")})
    plain.load_state_dict(weights)  # strict: every key, every shape
    # The weights gathered on rank 0 are the shards' own values (DCP's offline conversion agrees).
    best = torch.load(full_dir / "checkpoints" / "best.ckpt", weights_only=True)
    dcp_to_torch_save(full_dir / "checkpoints" / best[dcp.SHARDED]["dir"], tmp_path / "offline.pt")
    offline = torch.load(tmp_path / "offline.pt", weights_only=False)["model"]
    assert all(torch.equal(offline[k], best["model"][k]) for k in best["model"])
    assert all(torch.equal(weights[k], best["model"][k]) for k in weights)


@pytest.mark.slow
def test_truncated_or_tampered_shards_give_one_line(fsdp_runs, tmp_path, cli):
    _, full_dir, _ = fsdp_runs
    copy = tmp_path / "runs" / "full" / full_dir.name
    shutil.copytree(full_dir, copy)
    ckpt = copy / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    folder = copy / "checkpoints" / state[dcp.SHARDED]["dir"]
    assert dcp.verified_folder(ckpt, state[dcp.SHARDED]) == folder

    shard = folder / "__1_0.distcp"
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match="__1_0.distcp is truncated"):
        dcp.verified_folder(ckpt, state[dcp.SHARDED])
    shard.write_bytes(original)
    meta = folder / ".metadata"
    data = bytearray(meta.read_bytes())
    data[len(data) // 2] ^= 0xFF
    meta.write_bytes(bytes(data))  # same size, one byte changed: caught before DCP unpickles it
    with pytest.raises(CheckpointError, match=r"\.metadata was changed"):
        dcp.verified_folder(ckpt, state[dcp.SHARDED])
    # Through the command (in this process): one line, exit code 2, nothing trained.
    code, _, err = cli("train", "trainer.epochs=4", "--resume", str(ckpt))
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert ".metadata was changed" in last and "Traceback" not in err and err.count("error:") == 1
    assert state["loop"] == torch.load(ckpt, weights_only=True)["loop"]
    shutil.rmtree(folder)
    with pytest.raises(CheckpointError, match="is missing"):
        dcp.verified_folder(ckpt, state[dcp.SHARDED])


# ------------------------------------------------------------------------------------------
# SLURM's warning signal
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_usr1_writes_a_checkpoint_and_requeues_the_slurm_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    fake = bin_dir / "scontrol"  # records its arguments where SLURM would requeue the job
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    cfg = write_config(tmp_path, small_config(tmp_path, name="slurm", trainer={"epochs": 200,
                                                                               "monitor": "val/accuracy"}))
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = _popen("train", "-c", str(cfg), cwd=tmp_path, env=env)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("runs/slurm/*/checkpoints/last.ckpt")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training never wrote a checkpoint"
        time.sleep(0.05)
    sent = time.time_ns()
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    last = next(tmp_path.glob("runs/slurm/*/checkpoints/last.ckpt"))
    assert last.stat().st_mtime_ns >= sent  # written after the signal, before the requeue
    state = torch.load(last, weights_only=True)
    assert 0 < state["loop"]["epoch"] < 200
    assert "requeued" in err
