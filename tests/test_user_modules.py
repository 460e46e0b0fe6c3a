"""Import paths to the user's own modules (`mydata:RankNpz`) work with no PYTHONPATH: the config
file's folder and the working directory are searched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, small_config

MODULE = '''
import torch
from torch.utils.data import Dataset


class RankNpz(Dataset):
    """A tiny ranking set of the user's own: (features, relevance, query id)."""

    def __init__(self, queries: int = 30):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(queries * 6, 5, generator=g)
        self.y = (self.x[:, 0] > 0).float()
        self.groups = torch.arange(queries).repeat_interleave(6)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.groups[i]
'''


def _kiln_without_cwd_on_path(*args: str, cwd) -> subprocess.CompletedProcess:
    """`kiln` as its console script runs it: `-P` keeps Python from putting the working directory
    (or a script's folder) on sys.path, so only torchkiln's own search finds user modules."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-P", "-m", "torchkiln", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def _config(tmp_path, folder):
    cfg = small_config(tmp_path, task="ranking", metrics=["ndcg@5"],
                       data={"dataset": {"type": "mydata:RankNpz"}, "val_split": 0.2, "test_split": 0.0,
                             "batch_size": 32},
                       model={"type": "MLP", "args": {"in_features": 5, "num_classes": 1, "hidden": [8]}},
                       trainer={"epochs": 1, "monitor": "val/ndcg@5"},
                       logging={"progress": False, "tensorboard": False, "plots": False})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_module_beside_the_config_file_imports(tmp_path):
    project = tmp_path / "project"
    cfg = _config(tmp_path, project)
    (project / "mydata.py").write_text(MODULE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _kiln_without_cwd_on_path("train", "-c", str(cfg), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "No module named" not in proc.stderr


def test_a_module_in_the_working_directory_imports(tmp_path):
    cfg = _config(tmp_path, tmp_path / "configs")
    work = tmp_path / "work"
    work.mkdir()
    (work / "mydata.py").write_text(MODULE)
    proc = _kiln_without_cwd_on_path("config", "show", "-c", str(cfg), cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _kiln_without_cwd_on_path("train", "-c", str(cfg), cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_module_found_nowhere_says_where_it_was_looked_for(tmp_path):
    cfg = _config(tmp_path, tmp_path / "configs")
    proc = _kiln_without_cwd_on_path("train", "-c", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "data.dataset.type: cannot import module 'mydata'" in line
    assert "the config file's folder and the working directory" in line


@pytest.mark.parametrize("source, where, error", [
    ("def broken(:\n", "badmod.py:1", "SyntaxError: "),
    ("import torch\n\nimport no_such_package_here\n", "badmod.py:3", "ModuleNotFoundError: No module named 'no_such_package_here'"),
    ("x = 1\nraise RuntimeError('no data folder\\nsecond line')\n", "badmod.py:2", "RuntimeError: no data folder ("),
])
def test_a_module_that_fails_as_it_imports_is_one_line_naming_its_file_and_line(tmp_path, source, where, error):
    (tmp_path / "badmod.py").write_text(source)
    proc = _kiln_without_cwd_on_path("train", "model.type=badmod:Net", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]  # no traceback
    assert "model.type: module 'badmod' (from 'badmod:Net') failed to import" in lines[0]
    assert f"{where}: {error}" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["badmod.py"]


def test_a_user_model_whose_constructor_fails_is_one_line(tmp_path):
    """Any exception from a user's constructor (not only a TypeError from bad arguments) names the
    config key and the class, in one line, before anything is created."""
    (tmp_path / "failing.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__()\n"
        "        raise RuntimeError('weights folder missing\\nsecond line')\n"
    )
    proc = _kiln_without_cwd_on_path("train", "model.type=failing:Net", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model: could not build failing:Net: RuntimeError: weights folder missing (--debug" in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["failing.py"]
