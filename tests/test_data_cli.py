"""`kiln data stats`, `kiln train --folds`, and image-folder trainings with broken files, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import kiln, small_config, write_config
from test_data import make_folder
from torchkiln.cli import main


def kiln_here(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (no interpreter start-up): exit code, stdout, stderr."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _image_cfg(tmp_path: Path, root: Path, trainer: dict | None = None, **data) -> dict:
    return small_config(
        tmp_path,
        data={"dataset": {"type": "ImageFolder", "args": {"root": str(root)}}, "val_split": 0.25,
              "test_split": 0.0, "batch_size": 8,
              "transforms": {"train": [{"type": "RandomHorizontalFlip"}], "eval": []}, **data},
        model={"type": "SmallCNN", "args": {"in_channels": 3, "width": 4}},
        trainer=trainer or {"epochs": 1, "monitor": "val/accuracy"},
    )


def test_data_stats_prints_counts_imbalance_sizes_mean_std_and_saves_histogram(tmp_path, capsys):
    from PIL import Image

    root = make_folder(tmp_path / "imgs", {"cat": 30, "dog": 10}, jpeg_every=0)
    cfg = write_config(tmp_path, _image_cfg(tmp_path, root, val_split=0.0))
    out = tmp_path / "stats"
    code, stdout, err = kiln_here(capsys, "data", "stats", "-c", str(cfg), "-o", str(out))
    assert code == 0, err
    assert "cat  30" in stdout and "dog  10" in stdout
    assert "imbalance ratio    3.00" in stdout
    assert "16x16 (40)" in stdout
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255
                       for p in sorted(root.rglob("*.png"))])
    stats = json.loads((out / "stats.json").read_text())
    assert np.allclose(stats["mean"], pixels.mean(axis=(0, 1, 2)), atol=1e-4)
    assert np.allclose(stats["std"], pixels.std(axis=(0, 1, 2)), atol=1e-4)
    png = out / "class_histogram.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_on_image_folder_skips_broken_files_and_lists_them(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", {"a": 20, "b": 20})
    good = (root / "a" / "1.png").read_bytes()
    (root / "a" / "truncated.png").write_bytes(good[:70])
    (root / "b" / "empty.png").write_bytes(b"")
    cfg = write_config(tmp_path, _image_cfg(tmp_path, root, on_error="skip", max_skipped=0.1))
    code, _, err = kiln_here(capsys, "train", "-c", str(cfg), "-q")
    assert code == 0, err
    run_dir = next((tmp_path / "runs" / "t").iterdir())
    listed = (run_dir / "skipped_files.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in listed) == ["empty.png", "truncated.png"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 1


@pytest.mark.slow
def test_broken_files_found_mid_epoch_are_skipped_the_same_way_after_a_resume(tmp_path):
    """Two PNGs that fail only when decoded: the run is killed (-9)
    mid-epoch 2 and resumed; its final weights equal an uninterrupted run's bit for bit, and
    skipped_files.txt lists each broken file once."""
    import os

    import torch

    from conftest import ROOT

    root = make_folder(tmp_path / "imgs", {"a": 24, "b": 24}, jpeg_every=0)
    for cls in ("a", "b"):
        (root / cls / "zz-truncated.png").write_bytes((root / cls / "1.png").read_bytes()[:70])
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    finals, listed = [], []
    for name, kill_at in (("ref", 0), ("killed", 8)):
        cfg = _image_cfg(tmp_path / name, root, on_error="skip", max_skipped=0.1,
                         trainer={"epochs": 2, "monitor": "val/accuracy", "checkpoint_every_steps": 2})
        cfg["model"] = {"type": "kiln_faults:FaultyCNN", "args": {"in_channels": 3, "width": 4, "num_classes": 2}}
        cfg["logging"] = {"progress": False, "plots": False}
        path = write_config(tmp_path, cfg, f"{name}.yaml")
        first = kiln("train", "-c", str(path), env={**env, "KILN_FAULT_KILL_AT": str(kill_at)})
        if kill_at:
            assert first.returncode == -9, first.stderr[-2000:]
            kiln("train", "-c", str(path), "--resume", "auto", env=env, check=True)
        else:
            assert first.returncode == 0, first.stderr[-2000:]
        (run_dir,) = (tmp_path / name / "runs" / "t").iterdir()
        finals.append(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["model"])
        listed.append(sorted((run_dir / "skipped_files.txt").read_text().splitlines()))
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    for lines in listed:
        assert [Path(ln.split("\t")[0]).relative_to(root).as_posix() for ln in lines] == \
            ["a/zz-truncated.png", "b/zz-truncated.png"]
        assert all("cannot decode image" in ln for ln in lines)


def test_train_with_a_corrupt_image_fails_with_one_line_naming_it(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 8, "b": 8})
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    cfg = write_config(tmp_path, _image_cfg(tmp_path, root, val_split=0.0, stratify=False,
                                            trainer={"epochs": 1, "monitor": "train/loss"}))
    proc = kiln("train", "-c", str(cfg), "-q")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "corrupt.png" in lines[0] and "on_error: skip" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_folds_runs_every_fold_and_reports_mean_and_spread(tmp_path, capsys):
    cfg = small_config(tmp_path, data={"folds": 3, "test_split": 0.0, "batch_size": 128},
                       trainer={"epochs": 1, "monitor": "val/accuracy"})
    code, stdout, err = kiln_here(capsys, "train", "--folds", "-q", "-c", str(write_config(tmp_path, cfg)))
    assert code == 0, err
    assert "val/accuracy: mean" in stdout and "over 3 folds" in stdout
    summary_path = next((tmp_path / "runs" / "t").glob("folds-*/folds.json"))
    result = json.loads(summary_path.read_text())
    bests = [r["best"] for r in result["runs"]]
    assert [r["fold"] for r in result["runs"]] == [0, 1, 2] and len(set(bests)) > 1
    assert result["mean"] == pytest.approx(np.mean(bests)) and result["std"] == pytest.approx(np.std(bests, ddof=1))
    for r in result["runs"]:
        run_cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert run_cfg["data"]["fold"] == r["fold"] and run_cfg["data"]["folds"] == 3
    code, _, err = kiln_here(capsys, "train", "--folds", "-q", "-c",
                             str(write_config(tmp_path, small_config(tmp_path), "plain.yaml")))
    assert code == 2 and "set data.folds" in err
