"""`kiln predict`, `torchkiln.load` and test-time augmentation on small real runs: one image
classification run trained by `kiln` in a fresh process (inspected by most tests here) and one
multi-head run trained in this process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import ROOT, kiln, small_config, write_config
from torchkiln.commands.train import train
from torchkiln.config.load import resolve
from torchkiln.errors import DataError

CLASSES = ["cat", "dog", "fox"]
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def _image(rng: np.random.Generator, label: int, size: int = 12) -> np.ndarray:
    """Noise with one bright channel per class: learnable in an epoch or two."""
    img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
    img[..., label] = np.clip(img[..., label].astype(int) + 120, 0, 255).astype(np.uint8)
    img[:, : size // 3, (label + 1) % 3] = 250  # a left stripe: a flip changes the input
    return img


def _save(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def images_run(tmp_path_factory):
    """A CsvImages run (3 classes, Normalize in the eval transforms), trained by `kiln train`, and an
    unlabeled folder of images (with a subfolder) to predict."""
    home = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    rows = ["image,label"]
    for i in range(60):
        _save(_image(rng, i % 3), home / "data" / "images" / f"{i:02d}.png")
        rows.append(f"images/{i:02d}.png,{CLASSES[i % 3]}")
    (home / "data" / "train.csv").write_text("\n".join(rows) + "\n")
    for i in range(7):
        _save(_image(rng, i % 3), home / "eval" / ("sub" if i >= 5 else "") / f"e{i}.png")
    cfg = small_config(
        home, data={"dataset": {"type": "CsvImages", "args": {"csv_file": str(home / "data" / "train.csv")}},
                    "batch_size": 16, "transforms": {"eval": [{"type": "Normalize", "args": {"mean": MEAN, "std": STD}}]}},
        model={"type": "SmallCNN", "args": {"in_channels": 3, "width": 8}},
        optimizer={"type": "Adam", "args": {"lr": 0.02}},
        trainer={"epochs": 2, "monitor": "val/accuracy"},
        logging={"progress": False, "plots": False, "tensorboard": False, "images": 0})
    kiln("train", "-q", "-c", str(write_config(home, cfg)), cwd=home, check=True)
    run = next((home / "runs" / "t").iterdir())
    return home, run


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _by_hand(run: Path, paths: list[Path]) -> torch.Tensor:
    """Softmax probabilities computed without the predictor: the checkpoint's weights in a SmallCNN,
    each image decoded with PIL, scaled to [0, 1] and normalized as the run's eval transforms say."""
    from PIL import Image

    from torchkiln.engine.checkpoint import load_checkpoint
    from torchkiln.models.small import SmallCNN

    state = load_checkpoint(run / "checkpoints" / "best.ckpt")
    model = SmallCNN(**state["config"]["model"]["args"])
    model.load_state_dict(state["model"])
    model.eval()
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
                     for p in paths])
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        return model(x).softmax(dim=1)


def test_predict_an_unlabeled_folder_writes_the_submission(images_run):
    home, run = images_run
    proc = kiln("predict", str(run), "--input", str(home / "eval"), "--id-col", "ImageID", "--pred-col", "ans",
                "--probs", "--topk", "2", "--out", str(home / "submission.csv"), cwd=home, check=True)
    assert proc.stdout.split() == [str(home / "submission.csv")]
    assert "rows/s" in proc.stderr
    rows = _rows(home / "submission.csv")
    ids = ["e0.png", "e1.png", "e2.png", "e3.png", "e4.png", "sub/e5.png", "sub/e6.png"]  # sorted, recursive
    assert [r["ImageID"] for r in rows] == ids
    assert list(rows[0]) == ["ImageID", "ans", "ans_index", *(f"prob_{c}" for c in CLASSES),
                             "top1", "top1_prob", "top2", "top2_prob"]
    probs = torch.tensor([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
    expected = _by_hand(run, [home / "eval" / i for i in ids])
    assert torch.allclose(probs, expected, atol=2e-6)
    assert [r["ans"] for r in rows] == [CLASSES[i] for i in expected.argmax(1).tolist()]
    assert [int(r["ans_index"]) for r in rows] == expected.argmax(1).tolist()
    assert all(r["top1"] == r["ans"] and float(r["top1_prob"]) >= float(r["top2_prob"]) for r in rows)


def test_predict_a_csv_without_labels_keeps_its_order_and_ids(images_run, cli):
    home, run = images_run
    order = [3, 0, 6, 1]
    names = ["e3.png", "e0.png", "sub/e6.png", "e1.png"]
    (home / "eval.csv").write_text("ImageID,path\n" + "".join(f"id{i},eval/{n}\n" for i, n in zip(order, names)))
    out = home / "from_csv.csv"
    code, _, err = cli("predict", str(run), "--input", str(home / "eval.csv"), "--image-col", "path",
                       "--id-col", "ImageID", "--probs", "--out", str(out))
    assert code == 0, err
    rows = _rows(out)
    assert [r["ImageID"] for r in rows] == [f"id{i}" for i in order]
    probs = torch.tensor([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
    assert torch.allclose(probs, _by_hand(run, [home / "eval" / n for n in names]), atol=2e-6)
    # A CSV without the image column: one line naming the column.
    code, _, err = cli("predict", str(run), "--input", str(home / "eval.csv"), "--out", str(out))
    assert code == 2 and "no column 'image'" in err and "--image-col" in err and len(err.strip().splitlines()) == 1


def test_a_broken_image_stops_with_one_line_or_is_skipped_and_listed(images_run, cli, tmp_path):
    home, run = images_run
    folder = tmp_path / "imgs"
    for i in range(5):
        _save(_image(np.random.default_rng(i), i % 3), folder / f"{i}.png")
    (folder / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "p.csv"
    code, _, err = cli("predict", str(run), "--input", str(folder), "--out", str(out), "--batch-size", "2")
    assert code == 2 and str(folder / "2.png") in err and "--on-error skip" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    code, _, err = cli("predict", str(run), "--input", str(folder), "--out", str(out), "--batch-size", "2",
                       "--on-error", "skip", "--probs")
    assert code == 0, err
    rows = _rows(out)
    assert [r["id"] for r in rows] == [f"{i}.png" for i in range(5)]
    assert all(v == "" for k, v in rows[2].items() if k != "id") and all(r["pred"] in CLASSES for r in rows if r["id"] != "2.png")
    listed = (tmp_path / "p_skipped.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith("2.png\t") and "2.png" in listed[0].split("\t")[1]


def test_images_of_several_sizes_stop_with_one_line_naming_the_file(images_run, tmp_path):
    """A run trained on one size (no Resize in its eval transforms) over a 10x16 image among 12x12
    ones: one line naming the file and the fix (it was the collate's traceback), from a folder, a
    CSV, and loader workers; no file written."""
    home, run = images_run
    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    _save(_image(rng, 0), folder / "a.png")
    _save(_image(rng, 1, size=16)[:10], folder / "b.png")
    (tmp_path / "in.csv").write_text("image\nimgs/a.png\nimgs/b.png\n")
    out = tmp_path / "submission.csv"
    for source, extra in ((folder, []), (tmp_path / "in.csv", []), (tmp_path / "in.csv", ["--num-workers", "2"])):
        proc = kiln("predict", str(run), "--input", str(source), "--out", str(out), *extra, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("error: samples in a batch differ in size ("), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert f"{folder / 'b.png'}{' (in.csv line 3)' if source.suffix else ''} is 10x16" in proc.stderr
        assert "Resize/CenterCrop in data.transforms.eval" in proc.stderr and not out.exists()


def test_predict_refuses_batch_size_and_workers_below_their_range(images_run, tmp_path):
    """--batch-size 0 / -3 and --num-workers -1 were the DataLoader's ValueError traceback."""
    home, run = images_run
    for flag, value, least in (("--batch-size", "0", 1), ("--batch-size", "-3", 1), ("--num-workers", "-1", 0)):
        proc = kiln("predict", str(run), "--input", str(home / "eval"), "--out", str(tmp_path / "p.csv"), flag, value)
        assert (proc.returncode, proc.stderr) == (2, f"error: {flag}: expected a number >= {least}; found {value}\n")
    assert list(tmp_path.iterdir()) == []


def test_tta_is_the_mean_of_the_separately_computed_views(images_run, tmp_path):
    import torchkiln
    from torchkiln.inference.tta import corner_crops

    home, run = images_run
    predictor = torchkiln.load(run)
    paths = sorted((home / "eval").rglob("*.png"))
    x = torch.stack([predictor.preprocess(p) for p in paths])

    def scores(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return predictor.model(batch).softmax(dim=1)

    from PIL import Image

    assert torch.allclose(predictor(paths), scores(x), atol=1e-6)  # paths, PIL images: the same inputs
    one = predictor(Image.open(paths[0]))
    assert one.shape == (3,) and torch.allclose(one, scores(x[:1])[0], atol=1e-6)
    for tta, views in (("flip", [x, x.flip(-1)]),
                       ("flip+crops", [v for b in [x, *corner_crops(x)] for v in (b, b.flip(-1))])):
        out = predictor.predict(home / "eval", tmp_path / f"{tta}.csv", tta=tta, probs=True, batch_size=4).out
        probs = torch.tensor([[float(r[f"prob_{c}"]) for c in CLASSES] for r in _rows(out)])
        expected = torch.stack([scores(v) for v in views]).mean(0)
        assert len(views) == {"flip": 2, "flip+crops": 10}[tta]
        assert torch.allclose(probs, expected, atol=2e-6), tta
        assert not torch.allclose(probs, scores(x), atol=1e-3)  # the views differ from the plain input
    # the crops: each the input's size, the corners of the input scaled up by 8/7
    crops = corner_crops(x)
    big = torch.nn.functional.interpolate(x, size=(14, 14), mode="bilinear", align_corners=False)
    assert all(c.shape == x.shape for c in crops)
    assert torch.equal(crops[0], big[..., :12, :12]) and torch.equal(crops[3], big[..., 2:, 2:])


def test_kiln_test_with_tta_scores_the_averaged_views(images_run, tmp_path):
    import torchkiln
    from torchkiln.commands.test import test
    from torchkiln.data.splits import dataset_labels
    from torchkiln.inference.run_data import run_split

    _, run = images_run
    results = test(run, tta="flip")
    assert json.loads((run / "test_metrics.json").read_text())["tta"] == "flip"
    predictor = torchkiln.load(run)
    out = predictor.predict("split:test", tmp_path / "test.csv", tta="flip").out
    preds = [CLASSES.index(r["pred"]) for r in _rows(out)]
    labels = dataset_labels(run_split(run, run / "checkpoints" / "best.ckpt", "test"))
    assert len(preds) == len(labels) == 6
    assert results["test/accuracy"] == pytest.approx(float(np.mean(np.asarray(preds) == labels)), abs=1e-6)


def test_export_onnx_and_pt2_round_trip_with_parity(images_run, cli):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    home, run = images_run
    code, out, err = cli("export", str(run), "--format", "onnx")
    export = run / "export"
    assert code == 0, err
    assert out.split() == [str(export / n) for n in ("model.safetensors", "model.json", "model.onnx")]
    for b in (1, 3, 7):
        assert f"onnx parity at batch {b}: max abs diff" in err
    code, out, err = cli("export", str(run), "--format", "pt2")
    assert code == 0 and "pt2 parity at batch 7" in err and out.split()[-1] == str(export / "model.pt2")
    card = json.loads((export / "model.json").read_text())
    assert card["input"] == {"shape": [3, 12, 12], "channels": 3, "dtype": "float32"}
    assert card["class_names"] == CLASSES and card["num_classes"] == 3 and card["task"] == "classification"
    assert card["model"] == {"type": "SmallCNN", "args": {"in_channels": 3, "width": 8, "num_classes": 3}}
    assert card["preprocessing"]["eval_transforms"][0]["type"] == "Normalize"
    assert card["torch"] == torch.__version__ and card["torchkiln"]
    assert set(card["parity"]["batches"]) == {"1", "3", "7"} and card["parity"]["batches"]["7"]["max_abs"] < 1e-4

    # The ONNX file at a batch size it was not exported with, on real images, matches the eager model.
    paths = sorted((home / "eval").rglob("*.png"))
    import torchkiln

    predictor = torchkiln.load(export)
    x = torch.stack([predictor.preprocess(p) for p in paths])
    session = onnxruntime.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.allclose(torch.from_numpy(logits).softmax(1).numpy(), _by_hand(run, paths).numpy(), atol=1e-5)
    program = torch.export.load(str(export / "model.pt2")).module()
    assert torch.allclose(program(x).softmax(1), _by_hand(run, paths), atol=1e-5)

    # torchkiln.load(EXPORT_DIR) in a fresh process: no run directory, same predictions.
    copy = home / "shipped"
    copy.mkdir()
    for name in ("model.json", "model.safetensors"):
        (copy / name).write_bytes((export / name).read_bytes())
    script = (f"import torchkiln\np = torchkiln.load({str(copy)!r})\n"
              f"r = p.predict({str(home / 'eval')!r}, {str(home / 'shipped.csv')!r}, probs=True)\n"
              "print(r.rows, p.class_names)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=home,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "7"
    probs = torch.tensor([[float(r[f"prob_{c}"]) for c in CLASSES] for r in _rows(home / "shipped.csv")])
    assert torch.allclose(probs, _by_hand(run, paths), atol=2e-6)


def test_export_onnx_without_the_extra_ends_in_one_line(images_run, cli, monkeypatch):
    _, run = images_run
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    code, out, err = cli("export", str(run), "--format", "onnx", "-o", "never")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["error: --format onnx needs the 'export' extra: pip install"
                                        " 'torchkiln[export]' (onnx, onnxscript, onnxruntime) (onnxscript is missing)"]


def test_parity_above_the_tolerance_fails_loudly():
    from torchkiln.commands.export import ExportError, check_parity

    model = torch.nn.Linear(4, 3).eval()
    inputs = torch.randn(7, 4)
    report = check_parity(model, inputs, lambda x: [model(x).detach()], "onnx")
    assert report["batches"]["3"]["max_abs"] == 0
    with pytest.raises(ExportError, match="onnx parity at batch 1: max abs diff .* above atol 0.0001"):
        check_parity(model, inputs, lambda x: [model(x).detach() + 1e-3], "onnx")


# ------------------------------------------------------------------------------------------
# multi-head: the submission's columns
# ------------------------------------------------------------------------------------------
HEADS = {"mask": 3, "gender": 2, "age": 3}


@pytest.fixture(scope="module")
def multihead_run(tmp_path_factory):
    from torchkiln.commands.train import train
    from torchkiln.config.load import resolve

    home = tmp_path_factory.mktemp("multihead")
    rng = np.random.default_rng(1)
    rows = ["image,mask,gender,age"]
    for i in range(36):
        _save(_image(rng, i % 3), home / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{i % 3},{i % 2},{(i // 3) % 3}")
    (home / "train.csv").write_text("\n".join(rows) + "\n")
    cfg = small_config(
        home, task={"type": "multihead", "args": {"heads": HEADS}},
        data={"dataset": {"type": "CsvImages", "args": {"csv_file": str(home / "train.csv"), "target": "heads",
                                                        "label_col": list(HEADS)}},
              "batch_size": 12, "val_split": 0.25, "test_split": 0.0},
        model={"type": "SmallCNN", "args": {"in_channels": 3, "width": 8, "num_classes": 8}},
        metrics=["accuracy"], trainer={"epochs": 1, "monitor": "val/combined/accuracy"},
        logging={"progress": False, "plots": False, "tensorboard": False, "images": 0})
    run, _ = train(resolve(yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False))), progress=False)
    for i in range(5):
        _save(_image(rng, i % 3), home / "eval" / "images" / f"{i}.png")
    return home, run


def test_multihead_submission_has_a_column_per_head_and_the_combined_class(multihead_run, cli):
    home, run = multihead_run
    out = home / "submission.csv"
    code, _, err = cli("predict", str(run), "--input", str(home / "eval" / "images"), "--id-col", "ImageID",
                       "--pred-col", "ans", "--probs", "--out", str(out))
    assert code == 0, err
    rows = _rows(out)
    assert list(rows[0])[:5] == ["ImageID", "mask", "gender", "age", "ans"]
    assert list(rows[0])[5:] == [f"{h}_prob_{c}" for h, n in HEADS.items() for c in range(n)]
    assert [r["ImageID"] for r in rows] == [f"{i}.png" for i in range(5)]
    for r in rows:
        assert int(r["ans"]) == int(r["mask"]) * 6 + int(r["gender"]) * 3 + int(r["age"])

    import torchkiln

    predictor = torchkiln.load(run)
    scores = predictor([home / "eval" / "images" / f"{i}.png" for i in range(5)])  # a dict by head
    assert set(scores) == set(HEADS)
    for h in HEADS:
        assert [int(r[h]) for r in rows] == scores[h].argmax(1).tolist()
        assert torch.allclose(scores[h].sum(1), torch.ones(5))


# ------------------------------------------------------------------------------------------
# rules, in this process
# ------------------------------------------------------------------------------------------
def test_multilabel_and_regression_writers():
    from torchkiln.tasks import MultiLabelTask, RegressionTask
    from torchkiln.tasks.predictions import PredictOptions

    opts = PredictOptions(pred_col="tags", probs=True, class_names=["a", "b", "c"], num_classes=3)
    writer = MultiLabelTask(threshold=0.5).prediction_writer(opts)
    assert writer.header() == ["id", "tags", "prob_a", "prob_b", "prob_c"]
    rows = writer.rows(["x", "y"], torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.1, 0.1]]))
    assert rows == [[["x", "a c", "0.9", "0.2", "0.5"]], [["y", "", "0.1", "0.1", "0.1"]]]

    two = RegressionTask(targets=2).prediction_writer(PredictOptions(pred_col="y"))
    assert two.header() == ["id", "y_0", "y_1"] and two.rows(["r"], torch.tensor([[1.5, -2.0]])) == [[["r", "1.5", "-2"]]]
    one = RegressionTask().prediction_writer(PredictOptions())
    assert one.header() == ["id", "pred"] and one.rows(["r", "s"], torch.tensor([0.25, 3.0])) == [[["r", "0.25"]], [["s", "3"]]]


def test_trainer_predict_takes_dict_outputs_and_needs_no_optimizer():
    from torch.utils.data import DataLoader, TensorDataset

    from torchkiln import Trainer
    from torchkiln.errors import SettingError
    from torchkiln.tasks import MultiHeadTask

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x)}

    model = TwoHeads()
    x = torch.randn(10, 4)
    trainer = Trainer(model, task=MultiHeadTask({"a": 3, "b": 2}))
    out = trainer.predict(DataLoader(TensorDataset(x, torch.zeros(10, 2, dtype=torch.long)), batch_size=4))
    assert set(out) == {"a", "b"} and out["a"].shape == (10, 3) and torch.allclose(out["b"], model(x)["b"].detach())
    with pytest.raises(SettingError, match="fit needs an optimizer"):
        trainer.fit(DataLoader(TensorDataset(x, torch.zeros(10, 2, dtype=torch.long))))


def test_rows_stay_in_input_order_for_a_writer_of_several_rows_per_input(tmp_path):
    """The writer interface a box-predicting task implements: any number of rows per input."""
    from torchkiln.inference.output import OrderedCsv
    from torchkiln.tasks.predictions import PredictionWriter, PredictOptions

    class Boxes(PredictionWriter):
        def header(self):
            return ["id", "box"]

        def rows(self, ids, scores):
            return [[[i, f"b{k}"] for k in range(int(n))] for i, n in zip(ids, scores.tolist())]

        def empty_rows(self, id_):
            return []

        def finish(self, out):
            (out.parent / "extra.json").write_text("[]")
            return [out.parent / "extra.json"]

    sink = OrderedCsv(tmp_path / "p.csv", Boxes(PredictOptions(), width=1), ["a", "b", "c", "d"], "skip")
    sink.failed([(1, "b: broken")])
    sink.add([0, 2], torch.tensor([2, 0]))
    sink.add([3], torch.tensor([1]))
    assert sink.close() == [tmp_path / "p.csv", tmp_path / "extra.json", tmp_path / "p_skipped.txt"]
    assert (tmp_path / "p.csv").read_text().split() == ["id,box", "a,b0", "a,b1", "d,b0"]
    assert sink.rows == 3 and sink.skipped == [("b", "b: broken")]


@pytest.mark.gpu
def test_predict_on_cuda_under_bf16_autocast_agrees_with_the_cpu(images_run, tmp_path):
    import torchkiln

    home, run = images_run
    paths = sorted((home / "eval").rglob("*.png"))
    cpu = torchkiln.load(run, device="cpu")(paths)
    gpu = torchkiln.load(run, device="cuda", precision="bf16")
    probs = gpu(paths)
    assert gpu.device.type == "cuda" and probs.device.type == "cpu"
    assert torch.allclose(probs, cpu, atol=3e-2)
    out = gpu.predict(home / "eval", tmp_path / "gpu.csv", tta="flip", probs=True).out
    assert len(_rows(out)) == len(paths)


def test_a_tensor_batch_gets_each_samples_probabilities(tmp_path):
    """A batch tensor is a batch (the softmax over each sample's classes, not across the samples):
    by the sample shape a `kiln train` run records, and by rank for a Python-API run without one."""
    import torchkiln
    from torchkiln import make_trainer

    cfg = small_config(tmp_path, model={"type": "MLP", "args": {"num_classes": 10, "hidden": [16]}},
                       trainer={"epochs": 1}, logging={"progress": False, "plots": False, "tensorboard": False})
    run, _ = train(resolve(cfg), progress=False)
    predictor = torchkiln.load(run)
    assert predictor.card["input"]["shape"] == [1, 8, 8]  # a digit, as the data set gives it
    x = torch.rand(5, 1, 8, 8)
    batch = predictor(x)
    assert batch.shape == (5, 10) and torch.allclose(batch.sum(1), torch.ones(5))
    assert torch.allclose(torch.stack([predictor(x[i]) for i in range(5)]), batch, atol=1e-6)
    with pytest.raises(DataError, match=r"neither one input of the run's shape \(1, 8, 8\) nor a batch"):
        predictor(torch.rand(5, 64))

    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    loader = DataLoader(TensorDataset(torch.randn(64, 64), torch.randint(0, 10, (64,))), batch_size=32)
    make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), epochs=1,
                 run_dir=tmp_path / "api", progress=False,
                 config={"model": {"type": "torch.nn:Linear", "args": {"in_features": 64, "out_features": 10}}}
                 ).fit(loader)
    rows = torch.randn(5, 64)
    scores = torchkiln.load(tmp_path / "api")(rows)
    assert scores.shape == (5, 10) and torch.allclose(scores.sum(1), torch.ones(5))


def test_a_python_api_run_without_its_model_config_says_what_to_give(tmp_path):
    """A run made by make_trainer without config=...: loading or exporting it says why it cannot
    rebuild the model and what to pass, and the export writes nothing."""
    import torchkiln
    from torchkiln import make_trainer
    from torchkiln.errors import CheckpointError

    model = nn.Linear(4, 3)
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=8)
    make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), epochs=1,
                 run_dir=tmp_path / "api", progress=False).fit(loader)
    with pytest.raises(CheckpointError, match=r"names no model type .*make_trainer\(config="):
        torchkiln.load(tmp_path / "api")
    proc = kiln("export", str(tmp_path / "api"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "names no model type" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "api" / "export").exists()
