"""Every example in README.md runs as a user would run it: through the real `kiln`, in fresh processes.

- Each YAML block is a config (trained for one epoch, and shown) or a fragment merged into the
  packaged default config and checked with `kiln config check`, which builds every part it names;
  the files a fragment names (data/train.csv, ltr.npz, weights/...) are made first, small.
- Each `kiln ...` line of a bash block runs through a shell with `kiln` on PATH, in order, in one
  working directory: placeholders (run directories, `my.yaml`, `x.yaml`) stand for real ones.
- The error messages it quotes are the ones `kiln` prints for those mistakes.
- The Python API example runs, with the model and loaders it assumes.

A name documented but not registered, an example that drifted from the code, or a message that
changed fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow
README = (ROOT / "README.md").read_text()
DEFAULT = yaml.safe_load((ROOT / "src" / "torchkiln" / "configs" / "default.yaml").read_text())
SKIP_LINE = ("make ", "torchrun ", "python benchmarks/", ".venv/bin/python")  # not kiln, or not here


def blocks(lang: str) -> list[str]:
    return [m.group(2) for m in re.finditer(r"```(\w*)\n(.*?)```", README, re.S) if m.group(1) == lang]


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`; a {type, args} of another type replaces the whole component."""
    if "type" in over and over.get("type") != base.get("type"):
        return dict(over)
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A working directory with `kiln` on PATH, the README's config as my.yaml, and the small files
    the README's fragments name."""
    home = tmp_path_factory.mktemp("user")
    bin_dir = home / "bin"
    bin_dir.mkdir()
    (bin_dir / "kiln").write_text(f"#!/bin/sh\nexec {sys.executable} -m torchkiln \"$@\"\n")
    (bin_dir / "kiln").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "src"),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    whole = [b for b in blocks("yaml") if {"name", "model", "data"} <= set(yaml.safe_load(b))]
    assert len(whole) == 1, "the README has one whole config"
    (home / "my.yaml").write_text(whole[0])
    one_epoch = merge(yaml.safe_load(whole[0]), {"trainer": {"epochs": 1}})
    (home / "x.yaml").write_text(yaml.safe_dump(one_epoch))  # the README's x.yaml: any config
    _data_files(home)
    return home, env


def _data_files(home: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    (home / "data" / "images").mkdir(parents=True)
    rows = ["image,label"]
    for i in range(30):
        label = ["cat", "dog", "fox"][i % 3]
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(home / "data" / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{label}")
    (home / "data" / "train.csv").write_text("\n".join(rows) + "\n")
    (home / "eval" / "images").mkdir(parents=True)  # the competition's unlabeled images (kiln predict)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(home / "eval" / "images" / f"{i}.png")
    # The README's np.savez line, with the arrays it assumes.
    features, relevance = rng.normal(size=(120, 20)), rng.integers(0, 3, 120)
    query_ids = np.repeat(np.arange(12), 10)
    namespace = {"np": np, "features": features, "relevance": relevance, "query_ids": query_ids}
    (python_savez,) = [b for b in blocks("python") if "np.savez" in b]
    cwd = os.getcwd()
    try:
        os.chdir(home)
        exec(python_savez, namespace)  # noqa: S102 - the README's own line
    finally:
        os.chdir(cwd)
    import timm
    from safetensors.torch import save_file

    (home / "weights").mkdir()
    save_file(timm.create_model("resnet18", num_classes=1000).state_dict(), str(home / "weights" / "resnet18.safetensors"))


def sh(cmd: str, home: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, cwd=home, env=env, capture_output=True, text=True, timeout=timeout)


def newest_run(home: Path, name: str = "digits-cnn", back: int = 0) -> str:
    runs = sorted(p for p in (home / "runs" / name).iterdir() if (p / "config.yaml").is_file())
    return str(runs[-1 - back].relative_to(home))


def test_yaml_blocks_are_configs_that_kiln_checks(user):
    home, env = user
    for i, block in enumerate(blocks("yaml")):
        data = yaml.safe_load(block)
        whole = {"name", "model", "data"} <= set(data)
        cfg = data if whole else merge(DEFAULT, data)
        path = home / f"readme-{i}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        checked = sh(f"kiln config check -c {path}", home, env)  # loads, validates and builds every part
        assert checked.returncode == 0, f"README yaml block {i}:\n{block}\n{checked.stderr[-1500:]}"
        if whole:
            shown = sh(f"kiln config show -c {path}", home, env)
            assert shown.returncode == 0, shown.stderr[-1500:]
            shown_cfg = yaml.safe_load(shown.stdout)  # nothing but the resolved config on stdout
            assert isinstance(shown_cfg, dict) and shown_cfg["name"] == data["name"], shown.stdout[:500]
            trained = sh(f"kiln train -q -c {path} trainer.epochs=1 output_dir=whole-config", home, env)
            assert trained.returncode == 0, trained.stderr[-1500:]


def _runnable(line: str) -> str | None:
    line = line.split("  #", 1)[0].strip()
    if not line or line.startswith(SKIP_LINE) or not line.startswith(("kiln", "python -m torchkiln")):
        return None
    if line.endswith("...") or "HOST:" in line:
        return None
    return line.replace(" [overrides]", "")


def _substitute(line: str, home: Path) -> str:
    """The README's placeholder run directories and checkpoints stand for this directory's runs."""
    if "runs/" not in line:
        return line
    words = shlex.split(line)
    stamped = [w for w in words if re.fullmatch(r"runs/[\w.-]+/\d{8}-\d{6}", w)]
    for back, w in enumerate(stamped):  # kiln report A B: two different runs
        line = line.replace(w, newest_run(home, back=back if len(stamped) > 1 else 0))
    if "runs/.../checkpoints/" in line:
        ckpt = re.search(r"runs/\.\.\./checkpoints/\S+", line).group(0)
        line = line.replace(ckpt, f"{newest_run(home)}/checkpoints/last.ckpt")
    return line


def test_every_kiln_line_in_the_readme_runs(user):
    home, env = user
    ran = []
    for block in blocks("bash"):
        for raw in block.splitlines():
            line = _runnable(raw)
            if line is None:
                continue
            cmd = _substitute(line, home)
            proc = sh(cmd, home, env)
            assert proc.returncode == 0, f"README line: {raw.strip()}\nran: {cmd}\n{proc.stderr[-2000:]}"
            ran.append(cmd)
    assert len(ran) >= 15, ran
    assert (home / "resolved.yaml").is_file() and (home / "kiln.schema.json").is_file()
    assert (home / "report" / "index.html").is_file()
    submission = (home / "submission.csv").read_text().splitlines()  # kiln predict ... --out submission.csv
    assert submission[0].startswith("ImageID,ans,") and [r.split(",")[0] for r in submission[1:]] == [
        f"{i}.png" for i in range(8)]


# The README's error examples and the mistakes that cause them.
MISTAKES = {
    "trainer.epoch: unknown key": {"trainer": {"epoch": 3}},
    "optimizer.type: unknown optimizer 'Adamw'": {"optimizer": {"type": "Adamw"}},
    "model.args.num_clases: unknown argument": {"model": {"args": {"num_clases": 10}}},
}


def test_the_quoted_error_messages_are_what_kiln_prints(user):
    home, env = user
    (quoted,) = [b for b in blocks("") if b.startswith("error:")]
    lines = [ln for ln in quoted.splitlines() if ln.strip()]
    assert len(lines) == len(MISTAKES)
    base = yaml.safe_load((home / "my.yaml").read_text())
    for line in lines:
        (mistake,) = [m for key, m in MISTAKES.items() if key in line]
        cfg = merge(base, mistake)
        if "num_clases" in line:
            cfg["model"]["args"].pop("num_classes")
        mine = home / "mistakes" / "my.yaml"
        mine.parent.mkdir(exist_ok=True)
        mine.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = sh("kiln train -c my.yaml", mine.parent, env)
        assert proc.returncode == 2 and proc.stderr.strip() == line, proc.stderr


def test_the_python_api_example_runs(tmp_path):
    (example,) = [b for b in blocks("python") if "make_trainer(" in b]
    setup = """
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchkiln.data.digits import Digits
torch.manual_seed(0)
x, y = Digits().fast_tensors()
train_loader = DataLoader(TensorDataset(x[:1200], y[:1200]), batch_size=64, shuffle=True)
val_loader = test_loader = DataLoader(TensorDataset(x[1200:], y[1200:]), batch_size=256)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
"""
    check = """
assert metrics["val/accuracy"] > 0.8, metrics
assert outputs.shape == (len(x) - 1200, 10)
from torchkiln.engine.checkpoint import load_checkpoint
assert load_checkpoint("runs/api/checkpoints/last.ckpt")["callbacks"]["HalveLR"] == {"steps": summary["global_step"]}
"""
    proc = subprocess.run([sys.executable, "-c", setup + example + check], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("checkpoints/best.ckpt", "metrics.csv", "train.log", "summary.json", "plots/curves.png"):
        assert (tmp_path / "runs" / "api" / name).is_file(), name
