"""Object detection: the annotation audit and `kiln data check`, the datasets (empty images, CSV
boxes), training steps on fixed boxes (also under bf16 autocast and gradient accumulation), mAP with
empty predictions, the prediction writers, and one small shapes run through `kiln` (data_report.json,
per-component losses, TensorBoard box pictures, kiln test's per-class AP, resume, kiln predict's
boxes CSV and COCO results JSON, --tta refused, kiln data stats)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import kiln, write_config
from torchkiln.data.detection.audit import FAULTS, Policy, audit, read_annotations

SIZE = 64


def _images(folder, names, size=SIZE):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name)


def hand_built(tmp_path):
    """One annotation of each fault, beside one good box; image 3 has no annotation, image 4 no file,
    image 2's size in the JSON is wrong."""
    _images(tmp_path / "images", ["1.png", "2.png", "3.png"])
    nan = float("nan")
    anns = [
        (1, 1, 1, [4, 4, 20, 20]),  # good
        (2, 1, 1, [50, 50, -16, -16]),  # inverted corners
        (3, 1, 2, [50, 40, 30, 10]),  # partly outside (x2 = 80 > 64)
        (4, 1, 1, [70, 70, 5, 5]),  # wholly outside
        (5, 1, 1, [10, 10, 0.5, 10]),  # tiny
        (6, 1, 1, [nan, 1, 2, 3]),  # non-finite
        (7, 99, 1, [1, 1, 5, 5]),  # no such image
        (8, 2, 9, [1, 1, 5, 5]),  # unknown category
        (1, 2, 2, [6, 6, 20, 20]),  # duplicate id
        (10, 2, 2, [6, 6, 20, 20]),  # good
    ]
    data = {
        "images": [{"id": 1, "file_name": "1.png", "width": SIZE, "height": SIZE},
                   {"id": 2, "file_name": "2.png", "width": SIZE + 8, "height": SIZE},
                   {"id": 3, "file_name": "3.png", "width": SIZE, "height": SIZE},
                   {"id": 4, "file_name": "gone.png", "width": SIZE, "height": SIZE}],
        "annotations": [{"id": i, "image_id": im, "category_id": c, "bbox": b, "iscrowd": 0, "area": 1.0}
                        for i, im, c, b in anns],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_the_audit_counts_one_box_of_each_fault(tmp_path):
    path = hand_built(tmp_path)
    report, fixed = audit(read_annotations(path), tmp_path / "images")
    assert dict(report.counts) == {k: 1 for k in FAULTS}
    assert report.without_annotations == [3]  # reported, kept
    kept = {a["id"]: a["bbox"] for a in fixed["annotations"]}
    assert kept == {1: [4, 4, 20, 20], 2: [34.0, 34.0, 16.0, 16.0], 3: [50.0, 40.0, 14.0, 10.0],
                    10: [6.0, 6.0, 20.0, 20.0]}
    assert [im["id"] for im in fixed["images"]] == [1, 2, 3]
    assert fixed["images"][1]["width"] == SIZE  # the file's size
    again, _ = audit(fixed, tmp_path / "images")
    assert again.faults == 0 and again.without_annotations == [3]
    dropped, _ = audit(read_annotations(path), tmp_path / "images", Policy(inverted="drop"))
    assert dropped.kept_annotations == 3


def test_csv_boxes_with_reversed_corners(tmp_path):
    from torchkiln.data.detection.audit import write_annotations

    _images(tmp_path / "images", ["a.png", "b.png"])
    rows = ["image,x1,y1,x2,y2,label", "a.png,40,30,10,5,cat", "b.png,2,2,30,30,dog", "b.png,5,5,90,20,cat"]
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    report, fixed = audit(read_annotations(tmp_path / "boxes.csv"), tmp_path / "images")
    assert report.counts["inverted"] == 1 and report.counts["partly_outside"] == 1 and report.faults == 2
    write_annotations(fixed, tmp_path / "fixed.csv")
    with open(tmp_path / "fixed.csv") as f:
        out = list(csv.DictReader(f))
    assert [(r["image"], r["x1"], r["y1"], r["x2"], r["y2"], r["label"]) for r in out] == [
        ("a.png", "10", "5", "40", "30", "cat"), ("b.png", "2", "2", "30", "30", "dog"),
        ("b.png", "5", "5", "64", "20", "cat")]


def test_kiln_data_check_fix_passes_strict(tmp_path):
    from torchkiln.cli import main

    path = hand_built(tmp_path)
    before = path.read_bytes()
    proc = kiln("data", "check", str(path), "--images", str(tmp_path / "images"), "--fix", str(tmp_path / "fixed.json"),
                "--strict", "--report", str(tmp_path / "report.json"))
    assert proc.returncode == 1, proc.stderr
    assert "inverted corners" in proc.stdout and "annotation 2, image 1" in proc.stdout
    assert path.read_bytes() == before  # the input is never touched
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["faults"] == {k: 1 for k in FAULTS} and report["images_without_annotations"] == 1
    assert main(["data", "check", str(tmp_path / "fixed.json"), "--images", str(tmp_path / "images"), "--strict",
                 "--report", str(tmp_path / "r2.json")]) == 0
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["data", "check", str(tmp_path / "bad.json"), "--images", str(tmp_path / "images"),
                 "--report", str(tmp_path / "r3.json")]) == 2


def test_a_missing_image_folder_is_one_line_and_nothing_is_written(tmp_path):
    """`--images nope` counted every image as a missing file (26 faults, kept 0 images) and wrote
    ./report.json with exit 0; COCODetection from a config did the same."""
    path = hand_built(tmp_path / "data")
    proc = kiln("data", "check", str(path), "--images", "nope", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("error: --images nope: folder not found; give the folder that holds the"
                           " annotations' images\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no report.json
    cfg = {"task": "detection", "data": {"dataset": {"type": "COCODetection", "args": {
        "annotations": str(path), "images": str(tmp_path / "nope")}}}, "model": {"type": "fasterrcnn_tiny"},
        "metrics": [], "output_dir": str(tmp_path / "runs")}
    proc = kiln("config", "check", "-c", str(write_config(tmp_path / "data", cfg)), cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"{path}: images {tmp_path / 'nope'}: folder not found" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_shapes_detection_refuses_a_folder_made_with_other_settings(tmp_path):
    """`kiln data shapes data/shapes --images 12` and then a config asking for 16 images trained on
    the 12 without a word: refused in one line saying what the folder was made with, before any run
    folder; a folder made with the config's settings (or written by the data set) is used."""
    shapes = tmp_path / "shapes"
    kiln("data", "shapes", str(shapes), "--images", "12", "--size", "64", check=True)
    made = (shapes / "annotations.json").read_bytes()
    assert json.loads(made)["info"]["made_with"] == {"images": 12, "size": 64, "seed": 0}
    cfg = {"name": "s", "task": "detection", "output_dir": str(tmp_path / "runs"),
           "data": {"dataset": {"type": "ShapesDetection", "args": {"root": str(shapes), "images": 16, "size": 64}},
                    "batch_size": 4},
           "model": {"type": "fasterrcnn_tiny", "args": {"min_size": 64, "max_size": 64}}, "metrics": [],
           "trainer": {"epochs": 1}, "logging": {"progress": False}}
    path = write_config(tmp_path, cfg)
    proc = kiln("train", "-q", "-c", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (f"{shapes}: this shapes demo folder was made with images 12, size 64, seed 0, but data.dataset.args"
            " asks for images 16, size 64, seed 0; set data.dataset.args to match, or remove") in proc.stderr
    assert not (tmp_path / "runs").exists() and (shapes / "annotations.json").read_bytes() == made
    assert kiln("config", "check", "-c", str(path), "data.dataset.args.images=12", cwd=tmp_path).returncode == 0
    fresh = tmp_path / "fresh"  # written by the data set itself on first use, then used again
    for _ in range(2):
        proc = kiln("config", "check", "-c", str(path), f"data.dataset.args.root={fresh}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    data = json.loads(made)
    del data["info"]  # a folder that does not say what it was made with
    (shapes / "annotations.json").write_text(json.dumps(data))
    proc = kiln("config", "check", "-c", str(path), "data.dataset.args.images=12", cwd=tmp_path)
    assert proc.returncode == 2 and "has no record of its settings" in proc.stderr


def _loaders(tmp_path, batch_size=2):
    from torch.utils.data import DataLoader

    from torchkiln.data.detection.collate import DetectionCollate
    from torchkiln.data.detection.datasets import coco_detection
    from torchkiln.data.detection.transforms import BoxTransformed, build_box_pipeline

    ds = coco_detection(str(hand_built(tmp_path)), str(tmp_path / "images"), boxes={"on_invalid": "fix"})
    steps = [{"type": "RandomHorizontalFlip", "args": {"p": 1.0}}]
    data = BoxTransformed(ds, build_box_pipeline(steps, "data.transforms.train"))
    return ds, data, DataLoader(data, batch_size=batch_size, collate_fn=DetectionCollate())


def test_images_without_annotations_have_empty_boxes(tmp_path):
    ds, data, loader = _loaders(tmp_path, batch_size=3)
    assert ds.classes == ["a", "b"] and len(ds) == 3
    image, target = ds[2]  # image 3: no annotation
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    images, targets = next(iter(loader))
    assert [t["boxes"].shape[0] for t in targets] == [3, 1, 0]  # image 1: the good, inverted and clipped boxes
    assert images[0].dtype == torch.float32 and float(images[0].max()) <= 1.0
    assert targets[0]["boxes"][0].tolist() == [SIZE - 24.0, 4.0, SIZE - 4.0, 24.0]  # flipped with the image


def _train(tmp_path, **settings):
    from torchkiln.engine.settings import make_trainer
    from torchkiln.models.detection import build_detector
    from torchkiln.tasks.detection import DetectionTask

    torch.manual_seed(0)
    ds, _, loader = _loaders(tmp_path)
    model = build_detector("fasterrcnn_tiny", 2, min_size=SIZE, max_size=SIZE)
    task = DetectionTask()
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=1e-3), task=task,
                           metrics=task.build_metrics([], 2), epochs=1, **settings)
    return ds, loader, trainer, trainer.fit(loader, loader)


def test_two_training_steps_on_fixed_boxes_and_prediction_files(tmp_path):
    from torchkiln.data.detection.writers import box_rows, write_coco_results
    from torchkiln.models.detection import build_detector

    model = build_detector("fasterrcnn_tiny", 2, min_size=SIZE, max_size=SIZE).train()
    inverted = {"boxes": torch.tensor([[50.0, 50.0, 34.0, 34.0]]), "labels": torch.tensor([1])}
    with pytest.raises(AssertionError, match="positive height and width"):  # what the audit prevents
        model([torch.rand(3, SIZE, SIZE)], [inverted])
    ds, loader, trainer, summary = _train(tmp_path)
    final = summary["final"]
    assert summary["global_step"] == 2 and math.isfinite(final["train/loss"])
    assert {"train/loss/classifier", "val/loss/box_reg", "val/map_50", "val/map", "val/ap_per_class/1"} <= set(final)
    assert "train/map_50" not in final  # no detections in train mode
    predicted = trainer.predict(loader)  # in process: one record per image, on the CPU
    records = predicted["detections"]
    assert len(records) == 3 and all(r["boxes"].device.type == "cpu" for r in records)
    for i, r in enumerate(records, 1):
        r.update(image_id=i, file=f"{i}.png")
        assert r["boxes"].shape == (len(r["labels"]), 4) and r["scores"].dtype == torch.float32
        assert len(box_rows(r, ds.classes)) == len(r["boxes"])
    n = write_coco_results(records, tmp_path / "results.json", ds.category_ids)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == n and all(r["category_id"] in (1, 2) and len(r["bbox"]) == 4 for r in results)


def test_coco_ids_read_the_training_annotations_json_or_csv(tmp_path):
    """--coco-ann is read as `kiln train` reads annotations: a COCO JSON or a boxes CSV; an
    unreadable one is a one-line DataError."""
    from torchkiln.errors import DataError
    from torchkiln.tasks.predictions import coco_ids

    (tmp_path / "boxes.csv").write_text("image,x1,y1,x2,y2,label\nb.png,1,1,5,5,dog\na.png,1,1,5,5,cat\n")
    assert coco_ids(str(tmp_path / "boxes.csv"), ["sub/a.png", "b.png"], ["cat", "dog"]) == ([2, 1], [1, 2])
    assert coco_ids(None, ["x", "y"], ["cat"]) == ([1, 2], None)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read the annotations") as err:
        coco_ids(str(tmp_path / "bad.json"), ["a.png"], ["cat"])
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="no category named bird"):
        coco_ids(str(tmp_path / "boxes.csv"), ["a.png"], ["bird"])


def test_bf16_autocast_and_gradient_accumulation(tmp_path):
    """Two micro-batches per optimizer step under bf16 autocast: one step, finite losses."""
    _, _, trainer, summary = _train(tmp_path, precision="bf16", accumulate=2)
    final = summary["final"]
    assert summary["global_step"] == 1  # 2 batches, accumulated into one optimizer step
    assert all(math.isfinite(final[k]) for k in ("train/loss", "train/loss/classifier", "train/loss/box_reg",
                                                  "val/loss", "val/map_50"))


def test_validation_boxes_are_collected_and_drawn():
    from torchkiln.loggers.images import boxes_image
    from torchkiln.loggers.validation import BoxSample, ValidationCollector, merge_samples
    from torchkiln.tasks.detection import DetectionTask

    collector = ValidationCollector.of(DetectionTask(), 3)
    images = [torch.rand(3, 32, 48) for _ in range(2)]
    det = {"boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.9])}
    true = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]]), "labels": torch.tensor([1])}
    for _ in range(2):
        collector.update(images, {"detections": [det, det]}, [true, true])
    (sample,) = collector.result()
    assert isinstance(sample, BoxSample) and len(sample.images) == 3  # max_images, over batches
    picture = boxes_image(sample.images[0], sample.predicted[0], sample.true[0], ["a", "b"])
    assert picture.shape == (32, 48, 3) and picture.dtype == np.uint8
    assert (picture == (40, 170, 60)).all(axis=2).any() and (picture == (196, 40, 40)).all(axis=2).any()
    (merged,) = merge_samples([[sample], [sample]], 4)  # DDP: the ranks' images, up to max_images
    assert len(merged.images) == 4


def _preds(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


def test_map_with_empty_predictions():
    from torchkiln.metrics.detection import MeanAP, MeanAPPart

    truth = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])},
             {"boxes": torch.tensor([[5.0, 5.0, 20.0, 20.0]]), "labels": torch.tensor([1])}]
    none = MeanAP(num_classes=2)
    none.update([_preds([], [], []), _preds([], [], [])], truth)  # an untrained detector
    assert float(none.compute()) == 0.0 and none.per_class().tolist() == [0.0, -1.0]  # no crash: all missed
    half = MeanAP(num_classes=2)
    part = MeanAPPart(half, "map_50")
    half.update([_preds([[0, 0, 10, 10]], [0.9], [1]), _preds([], [], [])], truth)
    part.update()
    assert float(part.compute()) == pytest.approx(51 / 101, abs=1e-3)  # the image with none: missed
    assert half.per_class().tolist()[1] == -1.0  # class 2 has no object


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """One small shapes run through kiln (1 epoch, the tiny detector), resumed to 2 epochs, then
    kiln predict over the image folder (kiln test and data stats run in-process, in their tests)."""
    home = tmp_path_factory.mktemp("shapes")
    cfg = {
        "name": "shapes", "seed": 0, "output_dir": str(home / "runs"), "task": "detection",
        "data": {"dataset": {"type": "ShapesDetection", "args": {"root": str(home / "shapes"), "images": 16,
                                                                   "size": SIZE}},
                 "val_split": 0.25, "test_split": 0.25, "batch_size": 4,
                 "transforms": {"train": [{"type": "RandomHorizontalFlip"}]}},
        "model": {"type": "fasterrcnn_tiny", "args": {"min_size": SIZE, "max_size": SIZE, "width": 16,
                                                      "box_batch_size_per_image": 32}},
        "optimizer": {"type": "AdamW", "args": {"lr": 1e-3}},
        "trainer": {"epochs": 1}, "logging": {"progress": False, "images": 2},
    }
    path = write_config(home, cfg)
    trained = kiln("train", "-q", "-c", str(path), check=True, timeout=600)
    (run,) = (home / "runs" / "shapes").iterdir()
    first = (run / "metrics.csv").read_text()
    resumed = kiln("train", "-q", "--resume", str(run), "trainer.epochs=2", check=True, timeout=600)
    predicted = kiln("predict", str(run), "--input", str(home / "shapes" / "images"), "--out", str(home / "boxes.csv"),
                     "--coco-ann", str(home / "shapes" / "annotations.json"), check=True, timeout=300)
    return home, run, path, first, predicted, trained.stderr + resumed.stderr


@pytest.mark.slow
def test_a_shapes_run_reports_its_audit_and_losses(shapes_run):
    home, run, _, first, _, _ = shapes_run
    injected = json.loads((home / "shapes" / "faults.json").read_text())
    (report,) = json.loads((run / "data_report.json").read_text()).values()
    assert {k: v for k, v in report["faults"].items() if v} == {k: v for k, v in injected.items()
                                                               if v and k in FAULTS}
    header = first.splitlines()[0].split(",")
    assert {"train/loss/classifier", "train/loss/objectness", "val/loss/classifier", "val/map_50", "val/map_75",
            "val/mar_100"} <= set(header)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["boxes"] == {"on_invalid": "fix", "min_size": 1.0}


@pytest.mark.slow
def test_a_shapes_run_draws_images_without_boxes_without_a_warning(shapes_run):
    """A validation picture with no true box, or no prediction above the score drawn (an untrained
    detector), sent torchvision's `UserWarning: boxes doesn't contain any box` to the console."""
    *_, logs = shapes_run
    assert "contain any box" not in logs and "UserWarning" not in logs, logs


@pytest.mark.slow
def test_tensorboard_shows_validation_boxes(shapes_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, _, _, _, _ = shapes_run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert sorted(tags) == ["val/boxes/0", "val/boxes/1"]  # logging.images: 2
    (event, *_) = acc.Images("val/boxes/0")
    assert (event.width, event.height) == (SIZE, SIZE) and event.encoded_image_string.startswith(b"\x89PNG")


@pytest.mark.slow
def test_kiln_test_prints_per_class_ap(shapes_run, capsys):
    _, run, _, _, _, _ = shapes_run
    from torchkiln.cli import main

    capsys.readouterr()
    assert main(["test", str(run)]) == 0
    out = capsys.readouterr().out
    assert "test/map_50" in out
    table = out.split("AP@[.50:.95]", 1)[1]
    assert all(name in table for name in ("rectangle", "ellipse", "triangle")), out


@pytest.mark.slow
def test_a_detection_run_resumes(shapes_run):
    _, run, _, first, _, _ = shapes_run
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1] == first.splitlines()[1]  # epoch 1 kept, epoch 2 added
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and "resumed" in (run / "train.log").read_text()


@pytest.mark.slow
def test_kiln_predict_writes_boxes_and_coco_results(shapes_run, tmp_path, capsys):
    from torchkiln.cli import main

    home, run, _, _, predicted, _ = shapes_run
    assert predicted.stdout.split() == [str(home / "boxes.csv"), str(home / "boxes.coco.json")]
    with open(home / "boxes.csv") as f:
        rows = list(csv.DictReader(f))
    files = sorted(p.name for p in (home / "shapes" / "images").iterdir())
    assert rows and list(rows[0]) == ["image", "x1", "y1", "x2", "y2", "label", "score"]
    assert {r["image"] for r in rows} <= set(files) and {r["label"] for r in rows} <= {"rectangle", "ellipse", "triangle"}
    assert all(0 <= float(r["x1"]) <= float(r["x2"]) <= SIZE and 0 <= float(r["score"]) <= 1 for r in rows)
    ann = json.loads((home / "shapes" / "annotations.json").read_text())
    ids = {im["file_name"]: im["id"] for im in ann["images"]}
    results = json.loads((home / "boxes.coco.json").read_text())
    assert len(results) == len(rows)  # one entry per box, ids from --coco-ann
    assert [(r["image_id"], r["category_id"]) for r in results] == [
        (ids[r["image"]], ["rectangle", "ellipse", "triangle"].index(r["label"]) + 1) for r in rows]
    from torchkiln.data.detection.audit import audit
    from torchkiln.data.detection.datasets import _coco_index

    truth = _coco_index(audit(read_annotations(home / "shapes" / "annotations.json"), home / "shapes" / "images")[1])
    assert len(truth.loadRes(results).getAnnIds()) == len(results)  # what a COCO evaluator reads
    x, y, w, h = results[0]["bbox"]
    assert [x, y, x + w, y + h] == pytest.approx([float(rows[0][k]) for k in ("x1", "y1", "x2", "y2")], abs=0.02)
    capsys.readouterr()
    assert main(["predict", str(run), "--input", str(home / "shapes" / "images"), "--out", str(tmp_path / "t.csv"),
                 "--tta", "flip"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tta flip" in err and "detection" in err
    assert not list(tmp_path.iterdir())  # refused before any file


@pytest.mark.slow
def test_kiln_data_stats_for_detection(shapes_run, tmp_path, capsys):
    from torchkiln.cli import main

    _, _, path, _, _, _ = shapes_run
    assert main(["data", "stats", "-c", str(path), "-o", str(tmp_path)]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["boxes"] > 0 and set(stats["class_counts"]) == {"rectangle", "ellipse", "triangle"}
    assert stats["boxes_per_image"]["max"] >= 1 and "box_sizes" in stats
    assert "per image" in capsys.readouterr().out
