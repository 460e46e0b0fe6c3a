"""`kiln new`: the project it makes installs with `pip install -e .` (its entry points registered) and
its own tests pass inside it, for each template; an existing folder is never overwritten.

The three templates' projects are made once and installed by one `pip install -e A -e B -e C --target
SITE` (no dependencies, no build isolation), put on PYTHONPATH with each project's `src` (what the
editable install's .pth adds), so the shared environment is left as it was and nothing is
downloaded. Their own tests (each a one-epoch training of the project's config) run in one pytest
process, one thread each, as the suite runs two workers on two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, kiln

pytestmark = pytest.mark.slow
TEMPLATES = ("classification", "multihead", "detection")


def install(projects: list[Path], site: Path) -> dict[str, str]:
    """`pip install -e .` of the projects into `site`; the environment that sees them."""
    editable = [arg for project in projects for arg in ("-e", str(project))]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", *editable, "--target", str(site)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = [str(ROOT / "src"), str(site), *(str(project / "src") for project in projects)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def projects(tmp_path_factory) -> tuple[dict[str, tuple[Path, str]], dict[str, str]]:
    """template -> (project folder, what `kiln new` said), and the environment with all installed."""
    home = tmp_path_factory.mktemp("new")
    made = {}
    for template in TEMPLATES:  # home/TEMPLATE/NAME: the tests' module names (TEMPLATE.NAME.tests...)
        name = f"kiln_{template[:5]}"  # cannot shadow the package NAME when they run in one pytest
        (home / template).mkdir()
        said = kiln("new", name, "--template", template, cwd=home / template, check=True).stdout
        made[template] = (home / template / name, said)
    return made, install([path for path, _ in made.values()], home / "site")


@pytest.fixture(scope="module")
def inner_tests(projects) -> dict[str, list[str]]:
    """Every project's own tests in one pytest process: template -> its test ids that passed."""
    made, env = projects
    home = made[TEMPLATES[0]][0].parent.parent
    (home / "pytest.ini").write_text("[pytest]\n")  # one rootdir above the projects: ids name the project
    paths = [str(path / "tests") for path, _ in made.values()]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--import-mode=importlib",
                           "-c", str(home / "pytest.ini"), "--rootdir", str(home), *paths], cwd=home, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = [line.split()[0] for line in proc.stdout.splitlines() if " PASSED" in line]
    return {t: [p.split("::")[1] for p in passed if p.startswith(f"{t}/{made[t][0].name}/tests/")] for t in TEMPLATES}


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_project_is_renamed_throughout(projects, template):
    path, said = projects[0][template]
    name = path.name
    expected = ["pyproject.toml", "README.md", ".gitignore", "configs/default.yaml", f"src/{name}/__init__.py",
                f"src/{name}/data.py", f"src/{name}/models.py", "tests/test_smoke.py"]
    assert all((path / rel).is_file() for rel in expected)
    texts = {p: p.read_text() for p in path.rglob("*") if p.is_file() and "egg-info" not in str(p)}
    assert not [p for p, t in texts.items() if "{{" in t or "__name__" in str(p)]
    pyproject = texts[path / "pyproject.toml"]
    camel = "".join(part.capitalize() for part in name.split("_"))
    assert f'{camel}Net = "{name}.models:{camel}Net"' in pyproject
    assert f'{camel}Data = "{name}.data:{camel}Data"' in pyproject
    extra = "[detection]" if template == "detection" else ""  # COCO reading and mAP for boxes
    assert f'dependencies = ["torchkiln{extra}>=' in pyproject
    assert f"type: {camel}Data" in texts[path / "configs" / "default.yaml"]
    readme = texts[path / "README.md"]
    assert "pip install -e ." in readme and "kiln train -c configs/default.yaml" in readme
    assert f"cd {name} && pip install -e . && kiln train -c configs/default.yaml" in said


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_installed_project_registers_its_names_and_its_tests_pass(inner_tests, template):
    # its tests: the names come from the installed package's entry points, a sample fits the
    # model, and one epoch of its config trains through `kiln train`
    assert sorted(inner_tests[template]) == ["test_a_sample_fits_the_model", "test_one_epoch_trains",
                                             "test_the_names_come_from_this_package"]


def test_an_existing_folder_is_never_overwritten(cli, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    code, out, err = cli("new", "taken")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "taken already exists; nothing was written" in err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
    code, _, err = cli("new", "other", "--dir", "taken", "--template", "detection")
    assert code == 2 and "already exists" in err
    code, _, err = cli("new", "My-Project")
    assert code == 2 and "not a package name" in err and not (tmp_path / "My-Project").exists()
