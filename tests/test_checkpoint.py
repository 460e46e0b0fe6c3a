"""Checkpoints: whole on disk, safe to load, exact to resume; stop signals, faults and export.

Faults are real: `kill -9` of a training subprocess (kiln_faults.FaultyCNN kills its own process
at a chosen forward pass), a kill while a checkpoint is half written, SIGTERM/SIGINT, a file-size
limit. The reference is the same config trained once without interruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, kiln, small_config, write_config
from torchkiln import __version__
from torchkiln.engine.checkpoint import load_checkpoint, save_checkpoint
from torchkiln.errors import CheckpointError

# One thread per process: the same numbers either way, and parallel test runs do not thrash.
FAULT_ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
EPOCHS, BATCHES = 2, 20  # digits train split (1257 samples) in batches of 64


def cnn_config(root: Path, num_workers: int = 0, **trainer) -> dict:
    """SmallCNN with dropout and BatchNorm (so every RNG and buffer matters), shuffled batches."""
    return small_config(
        root,
        data={"num_workers": num_workers},
        model={"type": "kiln_faults:FaultyCNN", "args": {"num_classes": 10, "width": 8, "dropout": 0.3}},
        trainer={"epochs": EPOCHS, "monitor": "val/accuracy", "checkpoint_every_steps": 4, **trainer},
        logging={"progress": False, "plots": False, "every_n_steps": 3},
    )


def run_dirs(root: Path, name: str = "t") -> list[Path]:
    return sorted(p for p in (root / "runs" / name).iterdir() if p.is_dir())


def kiln_faulty(*args, env=None, **kw):
    return kiln(*args, env={**FAULT_ENV, **(env or {})}, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every resumed run must match bit for bit."""
    root = tmp_path_factory.mktemp("reference")
    kiln_faulty("train", "-c", str(write_config(root, cnn_config(root))), check=True)
    (run,) = run_dirs(root)
    return run


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """A finished one-epoch MLP run with mid-epoch checkpoints, keep_last 2."""
    root = tmp_path_factory.mktemp("mlp")
    cfg = small_config(root, trainer={"epochs": 1, "checkpoint_every_steps": 5, "keep_last": 2},
                       logging={"progress": False, "plots": False})
    kiln("train", "-c", str(write_config(root, cfg)), check=True)
    (run,) = run_dirs(root)
    return run


def copy_run(run: Path, root: Path) -> Path:
    """A copy of `run` under root/runs/<name>/, with a config that points auto-resume there."""
    dest = root / "runs" / run.parent.name / run.name
    shutil.copytree(run, dest)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["output_dir"] = str(root / "runs")
    write_config(root, cfg)
    return dest


# ------------------------------------------------------------------------------------------
# what the checkpoint holds
# ------------------------------------------------------------------------------------------
def test_checkpoint_holds_complete_plain_state(mlp_run):
    raw = torch.load(mlp_run / "checkpoints" / "last.ckpt", weights_only=True)  # plain data only
    assert raw["model"] and all(isinstance(v, torch.Tensor) for v in raw["model"].values())
    state = load_checkpoint(mlp_run / "checkpoints" / "last.ckpt")  # the rest unpacked
    assert state["model"].keys() == raw["model"].keys()
    assert state["torchkiln"] == __version__ and state["torch"] == str(torch.__version__)
    from torchkiln.inference.card import CLASS_NAMES_KEY, INPUT_KEY, NORMALIZATION_KEY

    # the resolved config, plus what inference needs from the data (class names, normalization, a sample's shape)
    assert state["config"][CLASS_NAMES_KEY] == [str(i) for i in range(10)]
    assert state["config"][INPUT_KEY] == {"shape": [1, 8, 8], "channels": 1, "dtype": "float32"}
    extra = (CLASS_NAMES_KEY, NORMALIZATION_KEY, INPUT_KEY)
    assert {k: v for k, v in state["config"].items() if k not in extra} == \
        yaml.safe_load((mlp_run / "config.yaml").read_text())
    json.dumps(state["config"])  # the resolved config is plain data, not pickled objects
    assert {"python", "numpy", "torch", "cuda"} <= set(state["rng"])
    assert state["loop"]["epoch"] == 1 and state["loop"]["global_step"] == BATCHES
    assert len(state["loop"]["history"]) == 1 and state["loop"]["best"] is not None
    assert state["optimizer"]["state"], "optimizer moments are saved"
    for key in ("schedule", "step", "model", "fingerprint"):
        assert key in state
    # keep_last 2 bounds the numbered checkpoints; best and last are always kept
    names = sorted(p.name for p in (mlp_run / "checkpoints").iterdir())
    assert names == ["best.ckpt", "last.ckpt", "step-000010.ckpt", "step-000015.ckpt"]
    mid = load_checkpoint(mlp_run / "checkpoints" / "step-000015.ckpt")
    assert mid["loop"]["batch_in_epoch"] == 15 and mid["epoch_accum"]["count"] > 0


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_optimizer_entry_is_the_optimizers_own_state_dict(mlp_run):
    """A plain torch user loads the optimizer entry with torch.load and optimizer.load_state_dict."""
    raw = torch.load(mlp_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(raw["optimizer"]) == {"state", "param_groups"}
    assert all(isinstance(t, torch.Tensor) for s in raw["optimizer"]["state"].values() for t in s.values())
    from torchkiln.models.small import MLP

    model = MLP(**yaml.safe_load((mlp_run / "config.yaml").read_text())["model"]["args"])
    model.load_state_dict(raw["model"])
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.load_state_dict(raw["optimizer"])
    assert same(optimizer.state_dict()["state"], raw["optimizer"]["state"])


def legacy_packed(obj):
    """The optimizer entry as torchkiln wrote it before checkpoints were streamed: its tensors in
    one flat tensor per dtype, an index of (pack, offset, ndim, shape...) rows, a skeleton."""
    tensors, key = [], "torchkiln-packed-tensors"

    def strip(o):
        if isinstance(o, torch.Tensor):
            tensors.append(o)
            return {key: len(tensors) - 1}
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items()}
        return type(o)(strip(v) for v in o) if isinstance(o, (list, tuple)) else o

    skeleton, groups = strip(obj), {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    width, rows, flat = 3 + max(t.dim() for t in tensors), [None] * len(tensors), []
    for g, ids in enumerate(groups.values()):
        flat.append(torch.cat([tensors[i].reshape(-1) for i in ids]))
        offset = 0
        for i in ids:
            shape = list(tensors[i].shape)
            rows[i] = [g, offset, len(shape), *shape] + [0] * (width - 3 - len(shape))
            offset += tensors[i].numel()
    return {key: skeleton, "flat": flat, "index": torch.tensor(rows, dtype=torch.int64)}


def test_checkpoints_of_the_previous_format_still_load(tmp_path, mlp_run):
    state = load_checkpoint(mlp_run / "checkpoints" / "last.ckpt")
    g = torch.Generator().manual_seed(0)
    state["optimizer"]["extra"] = [torch.arange(4), torch.empty(0, 2), torch.ones(2, 1, 2, dtype=torch.bfloat16),
                                   torch.randn(2, 3, generator=g).t(), "text", None]
    old = {**state, "optimizer": legacy_packed(state["optimizer"])}
    torch.save(old, tmp_path / "old.ckpt")
    back = load_checkpoint(tmp_path / "old.ckpt")
    assert same(back, state)
    back["optimizer"]["state"][0]["exp_avg"].add_(1)  # each its own storage, not a view of the pack
    assert not torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])


def big_state(mb: int = 48) -> dict:
    g = torch.Generator().manual_seed(1)
    n = mb * (1 << 20) // 4 // 6
    return {"format": "torchkiln-checkpoint", "model": {f"w{i}": torch.randn(n, generator=g) for i in range(6)},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "loop": {"history": [{"epoch": 1}]}}


def test_save_streams_to_the_file_and_load_reads_in_place(tmp_path):
    """No in-memory copy of the archive on either side (the old save built one in a BytesIO)."""
    import tracemalloc

    state, path = big_state(), tmp_path / "big.ckpt"
    tracemalloc.start()
    try:
        save_checkpoint(state, path)
        saved_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        back = load_checkpoint(path)
        loaded_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert path.stat().st_size > 48 << 20
    assert saved_peak < 4 << 20 and loaded_peak < 4 << 20, (saved_peak, loaded_peak)
    assert same(back, state)
    assert same(torch.load(path, weights_only=True), state)  # a plain torch.save archive


def test_truncated_or_flipped_checkpoints_are_caught(tmp_path):
    state, path = big_state(16), tmp_path / "big.ckpt"
    save_checkpoint(state, path)
    data = path.read_bytes()
    for cut in (100, len(data) // 3, len(data) - 100, len(data) - 1):
        bad = tmp_path / f"cut-{cut}.ckpt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|corrupted") as info:
            load_checkpoint(bad)
        assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)
    import zipfile

    with zipfile.ZipFile(path) as archive:  # one bit flipped inside a tensor's record
        record = next(i for i in archive.infolist() if i.filename.endswith("/data/3"))
    flipped = bytearray(data)
    flipped[record.header_offset + record.compress_size // 2 + 200] ^= 0x10
    bad = tmp_path / "flipped.ckpt"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"record \S+/data/3 fails its checksum"):
        load_checkpoint(bad)


def test_a_flipped_bit_in_a_big_record_is_caught(tmp_path):
    """Records of 8 MiB and more are checksummed chunk by chunk while they are read (another path
    than small records): a bit flipped deep inside one, past its first chunk, is still caught."""
    import zipfile

    from torchkiln.engine.checkpoint import CHECK_CHUNK

    state, path = big_state(64), tmp_path / "big.ckpt"  # six records of ~10.7 MiB
    save_checkpoint(state, path)
    with zipfile.ZipFile(path) as archive:
        record = next(i for i in archive.infolist() if i.filename.endswith("/data/2"))
    assert record.file_size >= 2 * CHECK_CHUNK
    data = bytearray(path.read_bytes())
    data[record.header_offset + record.compress_size - 4096] ^= 0x01  # in the record's last chunk
    bad = tmp_path / "flipped.ckpt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"record \S+/data/2 fails its checksum"):
        load_checkpoint(bad)
    assert same(load_checkpoint(path), state)  # the same file unflipped loads


def test_the_file_is_synced_before_its_rename_and_the_folder_after(tmp_path, monkeypatch):
    """What makes a checkpoint whole after a power loss, not only after a crash: the temp file's
    bytes reach the disk before it takes the final name, and the rename reaches it before save returns."""
    from torchkiln.engine import checkpoint

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    path = tmp_path / "run" / "last.ckpt"
    save_checkpoint(big_state(1), path)
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert Path(events[0][1]).parent == path.parent and Path(events[0][1]).name != path.name  # the temp file
    assert events[1][1] == str(path) and Path(events[2][1]) == path.parent  # then the folder


def test_background_write_is_one_snapshot_taken_at_save(tmp_path):
    from torchkiln.engine.checkpoint import CheckpointWriter, snapshot

    state = big_state(4)
    copied = snapshot(state)
    assert same(copied, state)
    assert all(copied["model"][k].data_ptr() != state["model"][k].data_ptr() for k in state["model"])
    assert copied["loop"]["history"] is not state["loop"]["history"]
    expected = snapshot(state)
    writer = CheckpointWriter(background=True)
    try:
        writer.save(state, tmp_path / "last.ckpt")
        for t in state["model"].values():  # training goes on at once
            t.add_(1)
        state["loop"]["history"].append({"epoch": 2})
        writer.wait()
    finally:
        writer.close()
    assert same(load_checkpoint(tmp_path / "last.ckpt"), expected)


# ------------------------------------------------------------------------------------------
# exact resume after kill -9
# ------------------------------------------------------------------------------------------
def assert_same_run(run: Path, ref: Path) -> None:
    """Same final weights (bitwise), optimizer state, history, and the same logged rows."""
    a = load_checkpoint(ref / "checkpoints" / "last.ckpt")
    b = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"weights differ: {k}"
    for i, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), f"optimizer state differs: {i}.{k}"
    assert a["loop"]["history"] == b["loop"]["history"]
    assert a["loop"]["global_step"] == b["loop"]["global_step"] == EPOCHS * BATCHES

    def csv_rows(run_dir):
        lines = (run_dir / "metrics.csv").read_text().splitlines()
        header = lines[0].split(",")
        keep = [i for i, h in enumerate(header) if not h.startswith("time/")]
        return [[line.split(",")[i] for i in keep] for line in lines]

    assert csv_rows(run) == csv_rows(ref)

    def jsonl(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    got, want = jsonl(run), jsonl(ref)
    steps = [r["step"] for r in got if "epoch" not in r]
    assert steps == list(range(1, EPOCHS * BATCHES + 1)), "step rows duplicated or missing"
    assert [r["epoch"] for r in got if "epoch" in r] == list(range(1, EPOCHS + 1))
    assert sorted(got, key=json.dumps) == sorted(want, key=json.dumps)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(run_dir, tag):
        acc = EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    for tag in ("train/loss_step", "val/accuracy", "train/loss"):
        assert scalars(run, tag) == scalars(ref, tag), f"TensorBoard {tag} differs"
    assert [s for s, _ in scalars(run, "train/loss_step")] == list(range(1, EPOCHS * BATCHES + 1))


def resumes(stderr: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m)) for m in
            re.findall(r"resumed at epoch (\d+), step (\d+) \(batch (\d+) of the epoch\)", stderr)]


@pytest.mark.parametrize("num_workers, background", [
    (0, False),
    (0, True),
])  # with loader workers: test_kill9_mid_epoch_with_augmenting_workers_resumes_exactly
def test_kill9_at_random_steps_then_resume_is_bitwise_exact(tmp_path, reference, num_workers, background):
    seed = int(os.environ.get("KILN_TEST_SEED", "1234")) + num_workers
    rng = random.Random(seed)
    # The first kill comes right after epoch 1 ends (first forward of epoch 2), the next two at
    # random steps inside epoch 2 (two resumes inside one epoch); then the run goes to its end.
    kills = [BATCHES + 1, rng.randint(6, 9), rng.randint(5, 8)]
    cfg = write_config(tmp_path, cnn_config(tmp_path, num_workers=num_workers, async_checkpoints=background))
    seen = []
    for i, kill_at in enumerate(kills + [0]):
        args = ["train", "-c", str(cfg)] + (["--resume", "auto"] if i else [])
        proc = kiln_faulty(*args, env={"KILN_FAULT_KILL_AT": str(kill_at)})
        assert proc.returncode == (-signal.SIGKILL if kill_at else 0), (kills, seed, proc.stderr[-2000:])
        seen += resumes(proc.stderr)
    (run,) = run_dirs(tmp_path)
    assert len(seen) == len(kills), seen
    if not background:
        # Written before training goes on: the newest checkpoint is the one just before the kill.
        assert seen[0] == (2, BATCHES, 0), "the first resume starts at an epoch end"
        assert seen[1][0] == seen[2][0] == 2 and seen[1][2] > 0 and seen[2][2] > seen[1][2], seen
    # Written from a background thread, a checkpoint may still be on its way when the kill comes:
    # the resume starts from the newest whole one, wherever that is, and ends the same.
    assert_same_run(run, reference), (kills, seed)


@pytest.mark.parametrize("stalled, stale, resumed_at, background", [
    # Write #3 is step-000008.ckpt's bytes (after step-000004 and last, a second name of it): cut
    # halfway, so the newest whole checkpoint is step 4's. Written by the training thread.
    (3, "step-000008.ckpt", 4, False),
    # Write #4 is last.ckpt at step 8, a second name of step-000008.ckpt, made but never renamed
    # into place: last.ckpt still holds step 4, and step-000008.ckpt is whole. Written from the
    # background thread, while training goes on until the next checkpoint waits for it.
    (4, "last.ckpt", 8, True),
])
def test_kill_while_writing_a_checkpoint(tmp_path, reference, stalled, stale, resumed_at, background):
    cfg = write_config(tmp_path, cnn_config(tmp_path, async_checkpoints=background))
    ready = tmp_path / "stalled"
    env = {**os.environ, **FAULT_ENV, "KILN_FAULT_STALL_SAVE": str(stalled), "KILN_FAULT_STALL_READY": str(ready)}
    proc = subprocess.Popen([sys.executable, "-m", "kiln_faults", "train", "-c", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.02)
        proc.kill()
    finally:
        proc.wait()
        proc.stderr.close()
    (run,) = run_dirs(tmp_path)
    ckpts = run / "checkpoints"
    temps = [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert [p.name for p in temps] == [f".tmp-{stale}.{proc.pid}"] and temps[0].stat().st_size > 0
    assert load_checkpoint(ckpts / "last.ckpt")["loop"]["global_step"] == 4  # the previous one, whole
    done = kiln_faulty("train", "-c", str(cfg), "--resume", "auto", check=True)
    assert resumes(done.stderr)[0][1] == resumed_at  # the newest whole checkpoint
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir()), "stale temp file not cleaned"
    assert_same_run(run, reference)


# ------------------------------------------------------------------------------------------
# stop signals
# ------------------------------------------------------------------------------------------
def start_training(cfg: Path, ready: Path, sleep: str, ready_at: int = 1, **popen) -> subprocess.Popen:
    env = {**os.environ, **FAULT_ENV, "KILN_FAULT_SLEEP": sleep, "KILN_FAULT_READY": str(ready),
           "KILN_FAULT_READY_AT": str(ready_at)}
    return subprocess.Popen([sys.executable, "-m", "torchkiln", "train", "-c", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "training never got going"
        time.sleep(0.01)


@pytest.mark.parametrize("sig, code, num_workers", [
    (signal.SIGTERM, 143, 0),
    pytest.param(signal.SIGINT, 130, 2, marks=pytest.mark.slow),
])
def test_signal_checkpoints_and_resume_continues(tmp_path, reference, sig, code, num_workers):
    cfg_dict = cnn_config(tmp_path, num_workers=num_workers, checkpoint_every_steps=None)
    cfg = write_config(tmp_path, cfg_dict)
    ready = tmp_path / "ready"
    # SIGINT goes to the whole process group, as Ctrl-C in a terminal does (workers included).
    proc = start_training(cfg, ready, sleep="0.05", ready_at=BATCHES + 7, start_new_session=True)
    try:
        wait_for(ready, proc)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    (run,) = run_dirs(tmp_path)
    assert f"Resume with: kiln train --resume {run}" in err
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    step, batch = state["loop"]["global_step"], state["loop"]["batch_in_epoch"]
    assert step >= BATCHES + 7 and batch == step - BATCHES, err  # stopped mid-epoch, after its step
    done = kiln_faulty("train", "--resume", str(run), check=True)
    assert resumes(done.stderr) == [(2, step, batch)]
    ref = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    got = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])
    assert ref["loop"]["history"] == got["loop"]["history"]


def test_second_ctrl_c_exits_at_once(tmp_path):
    cfg = write_config(tmp_path, cnn_config(tmp_path))
    ready = tmp_path / "ready"
    proc = start_training(cfg, ready, sleep="60")  # each training step takes a minute
    try:
        wait_for(ready, proc)
        proc.send_signal(signal.SIGINT)
        for line in proc.stderr:  # wait until the first Ctrl-C was heard
            if "received SIGINT" in line:
                break
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=50)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 30, "the second Ctrl-C did not stop the run at once"
    assert "interrupted" in err


# ------------------------------------------------------------------------------------------
# safe loading and clear errors
# ------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def one_line_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_pickle_payload_is_refused_and_never_runs(tmp_path, mlp_run):
    run = copy_run(mlp_run, tmp_path)
    marker = tmp_path / "MARKER"
    evil = run / "checkpoints" / "zz-evil.ckpt"
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    state["payload"] = _Payload(marker)
    torch.save(state, evil)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(evil)
    proc = kiln("train", "--resume", str(evil))
    one_line_error(proc, str(evil), "refused to load")
    proc = kiln("test", str(run), "--checkpoint", str(evil))
    one_line_error(proc, str(evil), "refused to load")
    # --resume auto: the payload is the newest file; it is skipped (and said so), never run
    proc = kiln("train", "-c", str(tmp_path / "cfg.yaml"), "--resume", "auto", "trainer.epochs=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipping unusable checkpoint: {evil}: refused" in proc.stderr
    assert not marker.exists(), "unpickling ran code from the checkpoint"


def test_damaged_or_foreign_checkpoints_give_one_clear_line(tmp_path, mlp_run):
    run = copy_run(mlp_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    wrong = tmp_path / "notes.ckpt"
    wrong.write_text("not a checkpoint\n")
    flipped = bytearray(data)
    flipped[len(data) // 2: len(data) // 2 + 16] = bytes(16)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(bytes(flipped))
    plain = tmp_path / "weights.ckpt"
    torch.save(load_checkpoint(last)["model"], plain)

    for path, what in [(truncated, "truncated"), (wrong, "wrong file type"), (corrupt, "corrupted"),
                       (plain, "not a torchkiln training checkpoint")]:
        with pytest.raises(CheckpointError, match=what) as info:
            from torchkiln.rundir import find_checkpoint

            find_checkpoint(str(path))
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    one_line_error(kiln("train", "--resume", str(truncated)), str(truncated), "truncated")
    one_line_error(kiln("train", "--resume", str(wrong)), str(wrong), "wrong file type")

    config_before = (run / "config.yaml").read_text()
    proc = kiln("train", "--resume", str(run), "model.args.hidden=[16]")
    one_line_error(proc, str(last), "does not fit this model", "features.1.weight")
    assert (run / "config.yaml").read_text() == config_before, "a failed resume changed config.yaml"
    # another optimizer type loads into torch's optimizer and fails at its first step: refused before
    proc = kiln("train", "--resume", str(run), "trainer.epochs=2", "optimizer.type=SGD")
    one_line_error(proc, str(last), "optimizer state is not SGD's", "momentum", "model.pretrained")
    assert (run / "config.yaml").read_text() == config_before, "a failed resume changed config.yaml"


def test_auto_resume_falls_back_past_a_truncated_newest_checkpoint(tmp_path, mlp_run):
    run = copy_run(mlp_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    proc = kiln("train", "-c", str(tmp_path / "cfg.yaml"), "--resume", "auto", "trainer.epochs=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipping unusable checkpoint: {last}: truncated" in proc.stderr
    assert "falling back to" in proc.stderr
    assert load_checkpoint(last)["loop"]["epoch"] == 2  # rewritten whole by the resumed run


def test_a_finished_run_with_a_truncated_last_checkpoint_resumes_from_the_fallback(tmp_path, mlp_run):
    """The run's summary and curves come from the checkpoint the resume used, not from the
    damaged last.ckpt it skipped."""
    run = copy_run(mlp_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.unlink()  # (last.ckpt may be a second name of best.ckpt)
    last.write_bytes(data[:len(data) // 2])
    proc = kiln("train", "--resume", str(run), "logging.plots=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipping unusable checkpoint: {last}" in proc.stderr and "already finished" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and (run / "plots" / "curves.png").is_file()
    other = write_config(tmp_path, small_config(tmp_path, model={"type": "SmallCNN"}), "other.yaml")
    proc = kiln("train", "-c", str(other), "--resume", str(run))  # -c beside a run: not what is resumed
    assert proc.returncode == 0 and f"-c {other} is not used: a resume continues" in proc.stderr, proc.stderr


def test_auto_resume_without_any_run_starts_fresh(tmp_path):
    cfg = small_config(tmp_path, trainer={"epochs": 1}, logging={"progress": False, "plots": False})
    proc = kiln("train", "-c", str(write_config(tmp_path, cfg)), "--resume", "auto", check=True)
    assert "no checkpoint of 't'" in proc.stderr and "starting a new run" in proc.stderr
    assert len(run_dirs(tmp_path)) == 1


# ------------------------------------------------------------------------------------------
# disk full, atomic writes
# ------------------------------------------------------------------------------------------
def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, mlp_run):
    run = copy_run(mlp_run, tmp_path)
    ckpts = run / "checkpoints"
    before = {p.name: sha(p) for p in ckpts.iterdir()}
    limit = (ckpts / "last.ckpt").stat().st_size // 2

    def small_files_only():  # every file this process writes is capped: a checkpoint cannot fit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "torchkiln", "train", "--resume", str(run),
                           "trainer.epochs=2"], env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=small_files_only)
    line = one_line_error(proc, "could not write checkpoint", "the previous checkpoint is intact")
    assert "file size limit" in line or "disk full" in line
    assert {p.name: sha(p) for p in ckpts.iterdir()} == before, "a checkpoint changed or a temp file stayed"
    assert load_checkpoint(ckpts / "last.ckpt")["loop"]["epoch"] == 1


def test_failed_write_leaves_the_final_name_untouched(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"a": torch.ones(3)}, path)
    before = sha(path)
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        save_checkpoint({"a": torch.ones(3)}, path / "nested.ckpt")  # its folder is a file
    with pytest.raises(Exception):  # noqa: B017 - pickling fails midway: no partial file, no temp
        save_checkpoint({"a": torch.ones(3), "f": lambda: 0}, path)
    assert sha(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------
def test_export_safetensors_loads_without_torchkiln(tmp_path, reference):
    from safetensors.torch import load_file

    from torchkiln.models.small import SmallCNN

    out = tmp_path / "export"
    proc = kiln_faulty("export", str(reference), "--format", "safetensors", "--out", str(out), check=True)
    assert proc.stdout.split() == [str(out / "model.safetensors"), str(out / "model.json")]
    info = json.loads((out / "model.json").read_text())
    assert info["model"]["type"] == "kiln_faults:FaultyCNN" and info["source_checkpoint"].endswith("best.ckpt")

    fresh = SmallCNN(**info["model"]["args"])
    fresh.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    trained = SmallCNN(**info["model"]["args"])
    trained.load_state_dict(load_checkpoint(reference / "checkpoints" / "best.ckpt")["model"])
    x = torch.rand(16, 1, 8, 8)
    fresh.eval()
    trained.eval()
    assert torch.equal(fresh(x), trained(x))

    script = ("import sys, json; sys.modules['torchkiln'] = None\n"
              "from safetensors.torch import load_file\n"
              f"w = load_file({str(out / 'model.safetensors')!r})\n"
              f"info = json.load(open({str(out / 'model.json')!r}))\n"
              "assert sorted(w) == sorted(info['tensors']), 'keys'\n"
              "print(len(w))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(fresh.state_dict())


def test_background_writer_keeps_order_and_reports_failures(tmp_path):
    from torchkiln.engine.checkpoint import CheckpointWriter

    writer = CheckpointWriter(background=True)
    state = {"w": torch.arange(6.0)}
    first = writer.save(state, tmp_path / "best.ckpt")
    state["w"] += 1  # serialized when handed over: later changes are not in the file
    writer.save(state, tmp_path / "last.ckpt", copy_of=first)  # a second name, after the first
    writer.wait()
    assert torch.equal(load_checkpoint(tmp_path / "last.ckpt")["w"], torch.arange(6.0))
    assert (tmp_path / "best.ckpt").stat().st_ino == (tmp_path / "last.ckpt").stat().st_ino

    (tmp_path / "broken.ckpt").mkdir()  # a folder where the file should go: the rename fails
    writer.save(state, tmp_path / "broken.ckpt")
    writer.save(state, tmp_path / "after.ckpt", copy_of=tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match="broken.ckpt: could not write checkpoint"):
        writer.wait()
    assert not (tmp_path / "after.ckpt").exists(), "written after a failure"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    writer.save(state, tmp_path / "again.ckpt")  # the failure was reported once; writing goes on
    writer.close()
    assert torch.equal(load_checkpoint(tmp_path / "again.ckpt")["w"], torch.arange(6.0) + 1)


@pytest.mark.slow
def test_kill9_mid_epoch_with_augmenting_workers_resumes_exactly(tmp_path):
    """Random augmentation drawn inside two loader workers: killed at a random step of epoch 2 and
    again a few steps after that resume, the remaining batches get the draws the uninterrupted run
    gave them (each batch's draws start from its own seed), so the run ends bit for bit the same."""
    def config(root: Path) -> Path:
        cfg = cnn_config(root, num_workers=2)
        cfg["data"]["transforms"] = {"train": [
            {"type": "RandomAffine", "args": {"degrees": 15, "translate": [0.1, 0.1]}}]}
        return write_config(root, cfg)

    (tmp_path / "ref").mkdir()
    (tmp_path / "killed").mkdir()
    kiln_faulty("train", "-c", str(config(tmp_path / "ref")), check=True)
    cfg = config(tmp_path / "killed")
    seed = int(os.environ.get("KILN_TEST_SEED", "1234"))
    kills, seen = [BATCHES + random.Random(seed).randint(5, 9), 6], []
    for i, kill_at in enumerate(kills + [0]):
        proc = kiln_faulty("train", "-c", str(cfg), *(["--resume", "auto"] if i else []),
                           env={"KILN_FAULT_KILL_AT": str(kill_at)})
        assert proc.returncode == (-signal.SIGKILL if kill_at else 0), (kills, seed, proc.stderr[-2000:])
        seen += resumes(proc.stderr)
    assert len(seen) == 2 and all(epoch == 2 and batch > 0 for epoch, _, batch in seen), seen  # mid-epoch 2
    assert seen[1][2] > seen[0][2], seen  # the second resume is further into the epoch
    (ref,) = run_dirs(tmp_path / "ref")
    (run,) = run_dirs(tmp_path / "killed")
    assert_same_run(run, ref)


def test_user_callback_with_state_survives_kill9_and_resume_auto(tmp_path):
    """A config-given callback that counts steps and changes the LR on its count: killed mid-epoch
    2 and resumed with --resume auto, the run ends with the same weights, bitwise, as one that never
    stopped, and the checkpoints carry the callback's count."""
    callback = [{"type": "kiln_faults:StepCountingLR", "args": {"every": 7, "factor": 0.5}}]
    (tmp_path / "ref").mkdir()
    ref_cfg = write_config(tmp_path / "ref", {**cnn_config(tmp_path / "ref"), "callbacks": callback})
    kiln_faulty("train", "-c", str(ref_cfg), check=True)
    cfg = write_config(tmp_path, {**cnn_config(tmp_path, async_checkpoints=False), "callbacks": callback})
    for i, kill_at in enumerate([BATCHES + 9, 0]):  # forward 9 of epoch 2
        proc = kiln_faulty("train", "-c", str(cfg), *(["--resume", "auto"] if i else []),
                           env={"KILN_FAULT_KILL_AT": str(kill_at)})
        assert proc.returncode == (-signal.SIGKILL if kill_at else 0), proc.stderr[-2000:]
    assert resumes(proc.stderr) == [(2, 28, 8)]  # the resume starts inside epoch 2, at step 28
    (run,) = run_dirs(tmp_path)
    (ref,) = run_dirs(tmp_path / "ref")
    a, b = (load_checkpoint(r / "checkpoints" / "last.ckpt") for r in (ref, run))
    assert b["callbacks"]["StepCountingLR"] == {"steps": EPOCHS * BATCHES}
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.5 ** (EPOCHS * BATCHES // 7))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"weights differ: {k}"
    assert a["loop"]["history"] == b["loop"]["history"]
