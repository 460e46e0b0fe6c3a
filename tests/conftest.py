"""Shared helpers: small real configs on digits, and `kiln` as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def small_config(tmp_path: Path, **sections) -> dict:
    """A fast digits config writing runs under tmp_path; sections override top-level keys."""
    cfg = {
        "name": "t",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": {"type": "Digits"}, "val_split": 0.2, "test_split": 0.1, "batch_size": 64},
        "model": {"type": "MLP", "args": {"num_classes": 10, "hidden": [32]}},
        "metrics": ["accuracy", "f1_macro"],
        "optimizer": {"type": "Adam", "args": {"lr": 0.01}},
        "trainer": {"epochs": 2, "monitor": "val/accuracy"},
        "logging": {"progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def kiln(*args: str, cwd: Path | None = None, timeout: float = 300, check: bool = False,
         env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m torchkiln ARGS` in a fresh process."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "torchkiln", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


# The longest files (seconds of a whole run on this machine), first: `make test` runs
# `pytest -n 2 --dist loadfile --no-loadscope-reorder`, which hands the files out in collection order
# (xdist's default reorders them by their number of tests), so the long ones start at once, the short
# ones fill the gaps, and the two workers end together instead of one running the README guard alone.
LONGEST_FIRST = ("test_readme.py", "test_checkpoint.py", "test_tune.py", "test_benchmarks.py", "test_fsdp.py",
                 "test_distributed.py", "test_registry_guard.py", "test_logging.py", "test_memory.py",
                 "test_detection.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first (LONGEST_FIRST); tests marked `gpu` skip cleanly where there is no CUDA."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run `kiln ARGS` in this process (cwd = tmp_path); returns (exit code, stdout, stderr)."""
    from torchkiln.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def cfg_factory(tmp_path):
    def make(**sections):
        return small_config(tmp_path, **sections)

    return make


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A run in this process may set torch's thread count (trainer.threads, fuzzed configs): the
    next test gets the count back (70 threads on 2 cores made every later test several times slower)."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
