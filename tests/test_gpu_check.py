"""benchmarks/gpu_check.py without a GPU: it skips cleanly, and its code path runs without pydantic."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
NO_PYDANTIC = "import sys, runpy; sys.modules['pydantic'] = None; sys.argv = {argv!r}; " \
              "runpy.run_path({script!r}, run_name='__main__')"


def run(argv, env=None):
    code = NO_PYDANTIC.format(argv=["gpu_check", *argv], script=str(SCRIPT))
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script finds src itself
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**full_env, **(env or {})}, cwd=ROOT)


def test_skips_cleanly_without_cuda():
    proc = run(["--quick"], env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("skipped: no CUDA")


@pytest.mark.slow
def test_trainer_and_hand_loop_agree_on_cpu_without_pydantic():
    """The benchmark's own path (Trainer through the Python API) on CPU with a small torchvision
    model: pydantic is blocked, and the trainer's loss equals the hand-written loop's."""
    proc = run(["--device", "cpu", "--arch", "squeezenet1_1", "--image-size", "32", "--batch", "2",
                "--steps", "2", "--warmup", "1", "--variants", "trainer-fp32,hand-fp32"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split("|")[1].strip(): line.split("|") for line in proc.stdout.splitlines()
            if line.startswith("| trainer-") or line.startswith("| hand-")}
    assert set(rows) == {"trainer-fp32", "hand-fp32"}
    assert rows["trainer-fp32"][6] == rows["hand-fp32"][6]  # mean loss, same to the printed digits
