"""The multi-head competition path through `kiln`: a CSV of images with mask / gender / age columns
(3 / 2 / 3 classes, imbalanced), balanced losses and samplers, pictures, stats, summary, predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from conftest import kiln, small_config, write_config
from torchkiln.commands import train as run
from torchkiln.config.load import resolve

HEADS = ("mask", "gender", "age")
# Every (mask, gender, age) combination listed is present at least twice (stratified splits of the
# combined class need that); mask 0 is the common class, as in the competition.
COMBOS = ([(0, 0, 0)] * 8 + [(0, 1, 0)] * 6 + [(0, 0, 1)] * 4 + [(0, 1, 1)] * 4 + [(0, 0, 2)] * 3
          + [(0, 1, 2)] * 3 + [(1, 0, 0)] * 4 + [(1, 1, 0)] * 3 + [(1, 0, 1)] * 2 + [(1, 1, 2)] * 3
          + [(2, 0, 0)] * 2 + [(2, 1, 1)] * 2 + [(2, 1, 2)] * 2 + [(2, 0, 2)] * 2)


def write_heads_csv(folder: Path) -> Path:
    """48 RGB images of 16x16 whose colour channels carry the three labels, and train.csv with
    image, mask, gender, age and the combined class mask*6 + gender*3 + age."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (mask, gender, age) in enumerate(COMBOS):
        pixels = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
        pixels += np.array([60 * mask, 90 * gender, 60 * age], dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "mask": mask, "gender": gender, "age": age,
                     "combined": mask * 6 + gender * 3 + age})
    path = folder / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def heads_csv(tmp_path_factory) -> Path:
    return write_heads_csv(tmp_path_factory.mktemp("faces"))


def mh_config(tmp_path: Path, csv_file: Path, heads: dict | None = None, combined_column: bool = False,
              **data) -> dict:
    """A 2-epoch multihead run on the CSV: label columns by head, or the one combined-class column."""
    args = {"csv_file": str(csv_file), "label_col": list(HEADS), "target": "heads"}
    if combined_column:
        args = {"csv_file": str(csv_file), "label_col": "combined", "classes": list(range(18))}
    cfg = small_config(
        tmp_path,
        task={"type": "multihead", "args": {"heads": heads or {"mask": 3, "gender": 2, "age": 3}}},
        data={"dataset": {"type": "CsvImages", "args": args}, "val_split": 0.25, "test_split": 0.0,
              "batch_size": 8, "stratify": False, **data},
        model={"type": "SmallCNN", "args": {"in_channels": 3, "width": 4}},
        metrics=["accuracy"],
        trainer={"epochs": 2},
        logging={"progress": False, "images": 4},
    )
    cfg["trainer"].pop("monitor")  # the task's default: val/combined/accuracy
    return cfg


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _run_dir(output: Path) -> Path:
    [run_dir] = [p for p in (output / "t").iterdir() if p.is_dir()]
    return run_dir


def _train_split_rows(cfg: dict, csv_file: Path) -> list[dict[str, str]]:
    """The CSV rows of the training split, by the split's own indices."""
    from torchkiln.config.build import build_data
    from torchkiln.data.stats import _raw

    indices = _raw(build_data(resolve(cfg, "test")).train).indices
    with open(csv_file, newline="") as f:
        rows = list(csv.DictReader(f))
    return [rows[i] for i in indices]


def _pictures_per_view(run_dir: Path) -> None:
    """Per head and for the combined class: a confusion matrix and a misclassified grid, each epoch."""
    acc = _events(run_dir)
    epoch_steps = [int(e.step) for e in acc.Scalars("val/loss")]
    assert len(epoch_steps) == 2
    for view in (*HEADS, "combined"):
        for kind in ("confusion_matrix", "misclassified"):
            images = acc.Images(f"val/{view}/{kind}")
            assert [i.step for i in images] == epoch_steps, (view, kind)
            assert images[0].width > 100 and images[0].height > 50


# ------------------------------------------------------------------------------------------
# balanced class weights in a head's loss
# ------------------------------------------------------------------------------------------
def test_balanced_head_losses_train_through_kiln_and_draw_pictures_per_head(tmp_path, heads_csv):
    heads = {"mask": {"classes": 3, "loss": {"type": "FocalLoss", "args": {"gamma": 2, "alpha": "balanced"}}},
             "gender": 2,
             "age": {"classes": 3, "loss": {"type": "CrossEntropyLoss", "args": {"weight": "balanced"}}}}
    cfg = mh_config(tmp_path, heads_csv, heads)
    out = kiln("train", "-c", str(write_config(tmp_path, cfg)), "-q")
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = _run_dir(tmp_path / "runs")
    _pictures_per_view(run_dir)
    assert (run_dir / "plots" / "confusion_matrix_mask.png").is_file()
    assert (run_dir / "plots" / "per_class_combined.csv").is_file()

    # The weights are scikit-learn's 'balanced' over the training split's labels of each head.
    trainer, _ = run.build_trainer(resolve(cfg, "test"), None, progress=False)
    rows = _train_split_rows(cfg, heads_csv)
    for head, name, classes in (("mask", "alpha", 3), ("age", "weight", 3)):
        labels = np.array([int(r[head]) for r in rows])
        counts = np.bincount(labels, minlength=classes)
        expected = torch.tensor(len(labels) / (classes * counts), dtype=torch.float32)
        torch.testing.assert_close(getattr(trainer.loss_fn.losses[head], name), expected)


def test_validation_views_of_a_multihead_batch_match_sklearn_per_head():
    from torchkiln.loggers.validation import ValidationCollector
    from torchkiln.tasks import MultiHeadTask

    task = MultiHeadTask({"mask": 3, "gender": 2, "age": 3})
    g = torch.Generator().manual_seed(0)
    collector = ValidationCollector(max_images=3, views=task.validation_views)
    outs, tgts = [], []
    for n in (7, 5):  # uneven batches; targets as a dict by head (CsvImages target: heads)
        out = torch.randn(n, 8, generator=g)
        y = {"mask": torch.randint(0, 3, (n,), generator=g), "gender": torch.randint(0, 2, (n,), generator=g),
             "age": torch.randint(0, 3, (n,), generator=g)}
        collector.update(torch.rand(n, 3, 8, 8, generator=g), out, y)
        outs.append(out)
        tgts.append(y)
    samples = {s.view: s for s in collector.result()}
    assert list(samples) == [*HEADS, "combined"]
    out = torch.cat(outs)
    truth = {h: torch.cat([y[h] for y in tgts]) for h in HEADS}
    preds = dict(zip(HEADS, [o.argmax(1) for o in out.split([3, 2, 3], dim=1)]))
    preds["combined"] = preds["mask"] * 6 + preds["gender"] * 3 + preds["age"]
    truth["combined"] = truth["mask"] * 6 + truth["gender"] * 3 + truth["age"]
    for view, c in (("mask", 3), ("gender", 2), ("age", 3), ("combined", 18)):
        s = samples[view]
        assert s.num_classes == c
        assert s.confusion().tolist() == confusion_matrix(truth[view], preds[view], labels=range(c)).tolist()
        assert 0 < len(s.images) <= 3 and bool((s.image_preds != s.image_targets).all())
    # Under DDP each rank's views are merged view by view.
    from torchkiln.loggers.validation import merge_samples

    merged = merge_samples([collector.result(), collector.result()], max_images=4)
    assert [m.view for m in merged] == [*HEADS, "combined"]
    for m in merged:
        assert torch.equal(m.confusion(), 2 * samples[m.view].confusion()) and len(m.images) <= 4


# ------------------------------------------------------------------------------------------
# balanced sampling on a head or on the combined class
# ------------------------------------------------------------------------------------------
def test_balanced_sampler_on_a_head_or_the_combined_class(tmp_path, heads_csv):
    from torchkiln.config.build import build_data, build_loaders
    from torchkiln.data.loaders import BalancedBatchSampler

    rows = None
    for sampler, column in (({"type": "balanced", "args": {"head": "mask"}}, "mask"), ("balanced", "combined")):
        cfg = mh_config(tmp_path, heads_csv, sampler=sampler)
        rows = rows or _train_split_rows(cfg, heads_csv)
        labels = np.array([int(r[column]) for r in rows])
        resolved = resolve(cfg, "test")
        batches = []
        for _ in range(2):  # the same config gives the same draws: a pure function of (seed, epoch)
            s = build_loaders(resolved, build_data(resolved))["train"].batch_sampler
            assert isinstance(s, BalancedBatchSampler)
            s.set_epoch(1)
            batches.append(list(s))
        torch.testing.assert_close(s.weights, torch.tensor(1.0 / np.bincount(labels)[labels], dtype=torch.float64))
        assert batches[0] == batches[1]
        s.set_epoch(1)
        s.skip(2)
        assert list(s) == batches[0][2:]


def test_balanced_head_sampler_resumes_mid_epoch_to_the_same_weights(tmp_path, heads_csv):
    cfg = mh_config(tmp_path, heads_csv, sampler={"type": "balanced", "args": {"head": "mask"}})
    cfg["trainer"]["checkpoint_every_steps"] = 3  # 5 batches an epoch: step 3 is mid-epoch 1
    cfg["logging"] = {"progress": False, "tensorboard": False, "plots": False}
    run_dir, _ = run.train(resolve(cfg, "test"), progress=False)
    ckpt = run_dir / "checkpoints" / "step-000003.ckpt"
    full = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    resumed_dir, _ = run.train(resolve(cfg, "test"), resume=ckpt, progress=False)
    resumed = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_sampler_head_is_checked_before_anything_runs(tmp_path, heads_csv, cli):
    cfg = mh_config(tmp_path, heads_csv, sampler={"type": "balanced", "args": {"head": "mak"}})
    code, _, err = cli("train", "-c", str(write_config(tmp_path, cfg)), "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.strip().endswith("cfg.yaml: data.sampler.args.head: 'mak' is not a head of the task;"
                                " did you mean 'mask'? (heads: mask, gender, age)")
    assert not (tmp_path / "runs").exists()
    cfg["data"]["sampler"] = {"type": "balanced", "args": {"hed": "mask"}}
    code, _, err = cli("config", "show", "-c", str(write_config(tmp_path, cfg)))
    assert code == 2 and err.strip().endswith("data.sampler.args.hed: unknown key; did you mean 'head'?")
    plain = small_config(tmp_path, data={"sampler": {"type": "balanced", "args": {"head": "mask"}}})
    code, _, err = cli("train", "-c", str(write_config(tmp_path, plain)), "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "data.sampler.args.head: the classification task has no heads; use data.sampler: balanced" in err


# ------------------------------------------------------------------------------------------
# a combined-class label column
# ------------------------------------------------------------------------------------------
def test_combined_class_column_with_balanced_sampler_trains_two_epochs(tmp_path, heads_csv):
    cfg = mh_config(tmp_path, heads_csv, combined_column=True, sampler="balanced")
    out = kiln("train", "-c", str(write_config(tmp_path, cfg)), "-q")
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = _run_dir(tmp_path / "runs")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "epoch" in r] == [1, 2]
    _pictures_per_view(run_dir)


def test_class_lists_that_do_not_fit_the_heads_are_refused(tmp_path, heads_csv, cli):
    cfg = mh_config(tmp_path, heads_csv, heads={"mask": 2, "gender": 2, "age": 3})
    path = write_config(tmp_path, cfg)
    code, _, err = cli("train", "-c", str(path), "-q")
    assert code == 2
    assert err.strip().splitlines() == [f"error: {path}: task.args.heads.mask.classes: 2, but column 'mask' has 3"
                                        " classes (0, 1, 2)"]
    assert not (tmp_path / "runs").exists()  # refused before anything was made
    # A combined-class column without `classes`: its class indices would skip the absent combined
    # classes (8, 10, 13, 15) and decode into the wrong heads.
    cfg = mh_config(tmp_path, heads_csv, combined_column=True)
    cfg["data"]["dataset"]["args"].pop("classes")
    code, _, err = cli("train", "-c", str(write_config(tmp_path, cfg)), "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "a combined-class label column must hold the classes 0..17 in order (found 14: 0, 1, 2" in err
    assert "data.dataset.args.classes: [0, 1, ..., 17]" in err


# ------------------------------------------------------------------------------------------
# kiln data stats, kiln summary, Trainer.predict
# ------------------------------------------------------------------------------------------
def test_data_stats_counts_and_histogram_per_head(tmp_path, heads_csv):
    cfg = mh_config(tmp_path, heads_csv)
    out_dir = tmp_path / "stats"
    out = kiln("data", "stats", "-c", str(write_config(tmp_path, cfg)), "--out", str(out_dir))
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads((out_dir / "stats.json").read_text())
    rows = _train_split_rows(cfg, heads_csv)
    for head, classes in (("mask", 3), ("gender", 2), ("age", 3), ("combined", 18)):
        counts = np.bincount([int(r[head]) for r in rows], minlength=classes)
        part = stats["heads"][head]
        assert list(part["class_counts"].values()) == counts.tolist(), head
        ratio = counts.max() / counts.min() if counts.min() else float("inf")
        assert part["imbalance_ratio"] == pytest.approx(ratio)
        assert (out_dir / f"class_histogram_{head}.png").is_file()
        if head != "combined":
            assert f"{head}: imbalance ratio {ratio:.2f}" in out.stdout
    mask = np.bincount([int(r["mask"]) for r in rows], minlength=3)
    assert f"mask: class counts\n  0  {mask[0]:>6}  {'#' * 30}\n" in out.stdout  # the largest: a full bar
    assert "no sample of 4 class(es): 8, 10, 13, 15" in out.stdout  # the combined classes never listed


def test_summary_of_a_multihead_config(tmp_path, heads_csv, cli):
    cfg = mh_config(tmp_path, heads_csv)
    code, out, err = cli("summary", "-c", str(write_config(tmp_path, cfg)))
    assert code == 0, err
    assert "input (8, 3, 16, 16)" in out
    assert "[8, 8]" in out  # the head is built 3 + 2 + 3 wide, as training builds it


def test_predict_concatenates_dict_outputs_per_head():
    from torch import nn

    from torchkiln.engine.settings import make_trainer
    from torchkiln.tasks import MultiHeadTask

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x)}

    torch.manual_seed(0)
    model = TwoHeads()
    x = torch.randn(11, 4)
    batches = [(x[i:i + 4], torch.zeros(len(x[i:i + 4]), 2, dtype=torch.long)) for i in range(0, 11, 4)]
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), task=MultiHeadTask({"a": 3, "b": 2}),
                      progress=False)
    out = trainer.predict(batches)
    assert set(out) == {"a", "b"} and out["a"].shape == (11, 3) and out["b"].shape == (11, 2)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(out["a"], expected["a"])
    torch.testing.assert_close(out["b"], expected["b"])
