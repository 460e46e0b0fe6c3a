"""`kiln new`: the project it makes installs with `pip install -e .` (its entry points registered) and
its own tests pass inside it, for each template; an existing folder is never overwritten.

The project is installed into a folder of its own (`pip install -e . --target`, no dependencies,
no build isolation), put on PYTHONPATH with the project's `src` (what the editable install's .pth
adds), so the shared environment is left as it was and nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, kiln

pytestmark = pytest.mark.slow


def install(project: Path, site: Path) -> dict[str, str]:
    """`pip install -e .` of the project into `site`; the environment that sees it."""
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-e", str(project), "--target", str(site)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(site), str(project / "src")])}


@pytest.fixture(scope="module", params=["classification", "multihead"])
def project(request, tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    home = tmp_path_factory.mktemp(request.param)
    name = f"kiln_{request.param[:5]}"
    made = kiln("new", name, "--template", request.param, cwd=home, check=True)
    return home / name, install(home / name, home / "site"), made.stdout


def test_the_project_is_renamed_throughout(project):
    path, _, said = project
    name = path.name
    expected = ["pyproject.toml", "README.md", "configs/default.yaml", f"src/{name}/__init__.py",
                f"src/{name}/data.py", f"src/{name}/models.py", "tests/test_smoke.py"]
    assert all((path / rel).is_file() for rel in expected)
    texts = {p: p.read_text() for p in path.rglob("*") if p.is_file()}
    assert not [p for p, t in texts.items() if "{{" in t or "__name__" in str(p)]
    pyproject = texts[path / "pyproject.toml"]
    camel = "".join(part.capitalize() for part in name.split("_"))
    assert f'{camel}Net = "{name}.models:{camel}Net"' in pyproject
    assert f'{camel}Data = "{name}.data:{camel}Data"' in pyproject
    readme = texts[path / "README.md"]
    assert "pip install -e ." in readme and "kiln train -c configs/default.yaml" in readme
    assert f"cd {name} && pip install -e . && kiln train -c configs/default.yaml" in said


def test_the_installed_project_registers_its_names_and_its_tests_pass(project):
    path, env, _ = project
    # its tests: the names come from the installed package's entry points, and one epoch trains
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout


def test_an_existing_folder_is_never_overwritten(cli, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    code, out, err = cli("new", "taken")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "taken already exists; nothing was written" in err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
    code, _, err = cli("new", "other", "--dir", "taken")
    assert code == 2 and "already exists" in err
    code, _, err = cli("new", "My-Project")
    assert code == 2 and "not a package name" in err and not (tmp_path / "My-Project").exists()
