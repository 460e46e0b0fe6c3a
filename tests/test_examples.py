"""Every worked example in examples/ runs as its README says (the notebook: tests/test_notebook.py)."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import os
import shutil

import pytest
import torch
import yaml

from conftest import ROOT, kiln

pytestmark = pytest.mark.slow
EXAMPLES = ROOT / "examples"


def load(path):
    """An example's module, imported from its file (what `python path` runs, less its argparse)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kiln_here(*args: str, cwd) -> str:
    """`kiln ARGS` through its entry point in this process, in `cwd`: what it printed."""
    from torchkiln.cli import main

    out, before = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            code = main(list(args))
    finally:
        os.chdir(before)
    assert code == 0, f"kiln {' '.join(args)} exited {code}"
    return out.getvalue()


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    """The mask competition from a copy of its folder: the data generator, `kiln train` (a fresh
    process, as the README runs it), then `kiln test` and `kiln predict` to submission.csv through the
    same entry point in this process (a fresh process each costs its start-up again)."""
    home = tmp_path_factory.mktemp("competition") / "mask_competition"
    shutil.copytree(EXAMPLES / "mask_competition", home)
    load(home / "make_data.py").make(home / "data", train=240, evaluate=30)
    kiln("train", "-c", "config.yaml", "-q", "trainer.epochs=2", cwd=home, check=True, env={"OMP_NUM_THREADS": "1"})
    [run] = sorted((home / "runs" / "mask-competition").iterdir())
    tested = kiln_here("test", str(run.relative_to(home)), cwd=home)
    kiln_here("predict", str(run.relative_to(home)), "--input", "data/eval/info.csv", "--image-col", "ImageID",
              "--id-col", "ImageID", "--pred-col", "ans", "--out", "submission.csv", "-q", cwd=home)
    return home, run, tested


def test_the_submission_fills_the_eval_info_in_its_order(competition):
    home, _, _ = competition
    with open(home / "data" / "eval" / "info.csv", newline="") as f:
        info = [r["ImageID"] for r in csv.DictReader(f)]
    with open(home / "submission.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["ImageID"] for r in rows] == info  # one row per input, in input order
    assert all(0 <= int(r["ans"]) < 18 for r in rows)  # the combined class: mask*6 + gender*3 + age


def test_the_competition_data_has_the_competitions_shape(competition):
    home, _, _ = competition
    with open(home / "data" / "train" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "mask", "gender", "age"] and len(rows) == 240
    assert {r["mask"] for r in rows} == {"0", "1", "2"} and {r["gender"] for r in rows} == {"0", "1"}
    assert all((home / "data" / "train" / r["image"]).is_file() for r in rows)
    with open(home / "data" / "eval" / "info.csv", newline="") as f:
        info = list(csv.DictReader(f))
    assert list(info[0]) == ["ImageID", "ans"] and len(info) == 30


def test_the_competition_trains_with_per_head_weights_and_balancing_and_tests_per_head(competition):
    home, run, tested = competition
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    heads = cfg["task"]["args"]["heads"]
    assert heads["mask"]["loss"]["args"] == {"weight": "balanced"}
    assert heads["age"]["loss"]["args"]["alpha"] == "balanced"
    assert cfg["data"]["sampler"] == {"type": "balanced", "args": {"head": "age"}}
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"val/{h}/f1_macro" for h in ("mask", "gender", "age", "combined")} <= set(header)
    assert (run / "checkpoints" / "best.ckpt").is_file()
    for view in ("mask", "gender", "age", "combined"):
        assert (run / f"test_{view}_per_class.csv").is_file()
        assert f"[{view}] test" in tested
    assert "not_wear" in tested and "over_60" in tested  # the heads' class names


def test_the_custom_model_and_dataset_train_through_the_python_api(tmp_path, capsys):
    out = tmp_path / "api"
    load(EXAMPLES / "custom_api.py").main(str(out), epochs=4)  # the Python API: in this process
    printed = capsys.readouterr().out
    best = float(printed.split("best val/accuracy ")[1].split()[0])
    assert best > 0.9, printed
    for name in ("metrics.csv", "summary.json", "train.log", "checkpoints/best.ckpt", "tensorboard"):
        assert (out / name).exists(), name
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(v == {"steps": 4 * 16} for v in state["callbacks"].values())  # HalveLR's own state


def test_the_readme_links_every_example():
    readme = (ROOT / "README.md").read_text()
    for path in ("examples/mask_competition", "examples/custom_api.py", "examples/quickstart.ipynb"):
        assert f"]({path}" in readme, path
