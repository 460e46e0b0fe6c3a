"""The CLI: fast help, lazy imports."""

from __future__ import annotations

import subprocess
import sys

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
