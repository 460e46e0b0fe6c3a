"""rundir.py: the one place for a run directory's names and the checkpoint lookups."""

import os
from types import SimpleNamespace

import pytest

from torchkiln.engine.checkpoint import FORMAT, save_checkpoint
from torchkiln.errors import CheckpointError
from torchkiln.rundir import (
    BEST,
    CHECKPOINTS,
    LAST,
    checkpoint_path,
    find_checkpoint,
    new_run_dir,
    plan_run_dir,
    run_dir_of,
)


def _run(cfg, epochs=(1,)):
    run_dir = new_run_dir(cfg)
    for i, epoch in enumerate(epochs):
        ckpt = save_checkpoint({"format": FORMAT, "loop": {"epoch": epoch}}, run_dir / CHECKPOINTS / LAST)
        os.utime(ckpt, ns=(i, 10**9 * (i + 1)))
    return run_dir


def test_find_checkpoint_on_a_run_root_a_run_dir_and_a_file(tmp_path):
    cfg = SimpleNamespace(output_dir=str(tmp_path / "runs"), name="t")
    assert find_checkpoint("auto", cfg) is None  # no runs yet: start a new one
    older, newer = _run(cfg), _run(cfg, epochs=(2,))
    assert newer != older and newer.parent == older.parent == tmp_path / "runs" / "t"  # a clash gets -N
    ckpt, state = find_checkpoint("auto", cfg)
    assert ckpt == newer / CHECKPOINTS / LAST and state["loop"]["epoch"] == 2
    assert run_dir_of(ckpt) == newer and run_dir_of(tmp_path / "loose.ckpt") == tmp_path
    assert find_checkpoint(str(older))[0] == older / CHECKPOINTS / LAST
    assert find_checkpoint(str(older / CHECKPOINTS / LAST))[1]["loop"]["epoch"] == 1
    with pytest.raises(CheckpointError, match="no such checkpoint or run directory"):
        find_checkpoint(str(tmp_path / "nope"))


def test_find_checkpoint_takes_the_newest_written_and_skips_a_damaged_one(tmp_path):
    cfg = SimpleNamespace(output_dir=str(tmp_path), name="t")
    run_dir = _run(cfg)
    best = save_checkpoint({"format": FORMAT, "loop": {"epoch": 3}}, run_dir / CHECKPOINTS / BEST)
    os.utime(best, ns=(0, 5 * 10**9))
    assert find_checkpoint(str(run_dir))[0] == best
    best.write_bytes(best.read_bytes()[:100])  # truncated: falls back to last.ckpt
    assert find_checkpoint(str(run_dir))[0] == run_dir / CHECKPOINTS / LAST


def test_names_of_a_run(tmp_path):
    cfg = SimpleNamespace(output_dir=str(tmp_path), name="t")
    assert plan_run_dir(cfg).parent == tmp_path / "t" and not (tmp_path / "t").exists()  # planned, not made
    assert checkpoint_path(tmp_path, "best") == tmp_path / "checkpoints" / "best.ckpt"
    assert checkpoint_path(tmp_path, "last") == tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint_path(tmp_path, "x/epoch-001.ckpt").as_posix() == "x/epoch-001.ckpt"
