"""The CLI: fast help, lazy imports, number flags checked as the command line is read."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, kiln


def test_help_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from torchkiln.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'pydantic', 'yaml', 'numpy', 'sklearn') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "src")}).stdout.strip()
    assert out == ""


def test_help_lists_subcommands():
    proc = kiln("--help", check=True)
    for cmd in ("train", "test", "config"):
        assert cmd in proc.stdout


def test_module_entry_point_and_version():
    proc = kiln("--version", check=True)
    assert proc.stdout.startswith("torchkiln ")


def test_the_process_ends_as_pythons_exit_would_less_the_teardown(tmp_path):
    """`kiln` skips only the freeing of modules at exit: the threads Python waits for are joined,
    the atexit handlers run, and the exit code and the streams' last lines are kept."""
    (tmp_path / "late.py").write_text(
        "import atexit, threading, time\n"
        "from pathlib import Path\n"
        "from torchkiln.data.digits import Digits\n\n"
        "def _later():\n    time.sleep(0.5)\n    Path('thread.txt').write_text('joined')\n\n"
        "threading.Thread(target=_later).start()  # not a daemon: Python's exit waits for it\n"
        "atexit.register(lambda: Path('atexit.txt').write_text('ran'))\n\n"
        "class LateDigits(Digits):\n    pass\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: {dataset: {type: 'late:LateDigits'}}\n")
    proc = kiln("config", "check", "-c", str(cfg), cwd=tmp_path, env={"PYTHONPATH": f"{ROOT / 'src'}:{tmp_path}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok: ") and proc.stdout.rstrip().splitlines()[-1].startswith("  monitor")
    assert (tmp_path / "thread.txt").read_text() == "joined" and (tmp_path / "atexit.txt").read_text() == "ran"
    bad = kiln("config", "check", "-c", str(cfg), "trainer.epoch=3", cwd=tmp_path,
               env={"PYTHONPATH": f"{ROOT / 'src'}:{tmp_path}"})
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert "trainer.epoch: unknown key" in bad.stderr


@pytest.mark.parametrize("args, line", [
    (["train", "--devices", "0"], "--devices: expected a number >= 1; found 0"),
    (["train", "--max-restarts", "-1"], "--max-restarts: expected a number >= 0; found -1"),
    (["train", "--fast-dev-run", "0"], "--fast-dev-run: expected a number >= 1; found 0"),
    (["train", "--memory-snapshot", "0"], "--memory-snapshot: expected a number >= 1; found 0"),
    (["train", "--overfit-batches", "2", "--overfit-threshold", "1.5"],
     "--overfit-threshold: expected a number > 0 and <= 1; found 1.5"),
    (["find-batch-size", "--max", "0"], "--max: expected a number >= 1; found 0"),
    (["find-batch-size", "--start", "0"], "--start: expected a number >= 1; found 0"),
    (["summary", "--batch-size", "0"], "--batch-size: expected a number >= 1; found 0"),
    (["summary", "--depth", "-1"], "--depth: expected a number >= 0; found -1"),
    (["data", "stats", "--max-images", "0"], "--max-images: expected a number >= 1; found 0"),
    (["data", "check", "a.json", "--images", "imgs", "--min-size", "-1"], "--min-size: expected a number >= 0; found -1.0"),
    (["data", "shapes", "out", "--images", "1"], "--images: expected a number >= 2; found 1"),
    (["data", "shapes", "out", "--size", "8"], "--size: expected a number >= 16; found 8"),
])
def test_a_number_flag_out_of_its_range_is_one_line_before_anything_runs(tmp_path, args, line):
    """`kiln train --devices 0` trained a whole run and `find-batch-size --max 0` answered 1: a number
    flag out of its range is refused as the command line is read, nothing made."""
    proc = kiln(*args, cwd=tmp_path)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"error: {line}\n", "")
    assert list(tmp_path.iterdir()) == []
