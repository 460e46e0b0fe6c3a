"""Logging and pictures: TensorBoard events, plots, always-on files, console, W&B offline, kiln report."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix

from conftest import kiln, small_config, write_config
from torchkiln.commands.train import train
from torchkiln.config.load import resolve
from torchkiln.loggers.validation import ValidationCollector


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One short digits run with every picture on: 2 epochs, histograms each epoch."""
    tmp = tmp_path_factory.mktemp("logged")
    cfg = small_config(tmp, logging={"progress": False, "every_n_steps": 5, "histograms": 1, "images": 8})
    run_dir, summary = train(resolve(cfg, "test"), progress=False)
    return run_dir, summary


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"),
                           size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_match_metrics_csv(logged_run):
    run_dir, summary = logged_run
    acc = _events(run_dir)
    tags = set(acc.Tags()["scalars"])
    rows = _csv(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    epoch_keys = {"train/loss", "train/accuracy", "train/f1_macro", "val/loss", "val/accuracy",
                  "val/f1_macro", "lr/group0", "time/epoch_s", "time/samples_per_s"}
    assert epoch_keys <= set(rows[0])
    assert epoch_keys | {"train/loss_step", "train/grad_norm", "hparam/best"} <= tags
    for key in epoch_keys - {"lr/group0"}:  # lr/group0 is also a per-step tag
        events = acc.Scalars(key)
        # Epoch scalars sit at the global step of the epoch's end (so a resume can purge them).
        assert [e.step for e in events] == [int(r["step"]) for r in rows], key
        for e, row in zip(events, rows):
            assert e.value == pytest.approx(float(row[key]), rel=1e-6, abs=1e-7), key
    assert all(float(r["time/samples_per_s"]) > 0 for r in rows)

    # Per-step scalars: one per optimizer step, equal to the JSONL step rows.
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_rows = [s for s in steps if "epoch" not in s]
    assert len(step_rows) == summary["global_step"] and [s["step"] for s in step_rows][:3] == [1, 2, 3]
    loss_events = acc.Scalars("train/loss_step")
    assert [e.step for e in loss_events] == [s["step"] for s in step_rows]
    for e, s in zip(loss_events, step_rows):
        assert e.value == pytest.approx(s["train/loss_step"], rel=1e-6)
        assert math.isfinite(s["train/grad_norm"]) and s["train/grad_norm"] > 0
    assert [s["epoch"] for s in steps if "epoch" in s] == [1, 2]

    # hparams: the config, with the final metrics and the best monitored value.
    assert acc.Scalars("hparam/best")[0].value == pytest.approx(summary["best"], rel=1e-6)
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["optimizer.args.lr"].number_value == pytest.approx(0.01)
    assert hp["model.type"].string_value == "MLP"


def test_tensorboard_figures_and_histograms(logged_run):
    run_dir, _ = logged_run
    acc = _events(run_dir)
    epoch_steps = [int(r["step"]) for r in _csv(run_dir / "metrics.csv")]  # each epoch's last step
    for tag in ("val/misclassified", "val/confusion_matrix"):
        images = acc.Images(tag)
        assert [i.step for i in images] == epoch_steps, tag
        assert images[0].width > 100 and images[0].height > 100
    hist = set(acc.Tags()["histograms"])
    assert {"weights/head.weight", "grads/head.weight", "weights/features.1.weight"} <= hist
    grads = acc.Histograms("grads/head.weight")
    assert [h.step for h in grads] == epoch_steps and grads[0].histogram_value.num == 10 * 32
    assert grads[0].histogram_value.sum_squares > 0


def test_plots_and_files(logged_run):
    run_dir, summary = logged_run
    for name in ("curves.png", "confusion_matrix.png", "per_class_f1.png"):
        with Image.open(run_dir / "plots" / name) as im:
            im.verify()
            assert im.size[0] > 300, name
    # Per-class numbers come from the best epoch's validation: their mean is that epoch's macro F1.
    per_class = _csv(run_dir / "plots" / "per_class.csv")
    assert [r["class"] for r in per_class] == [str(i) for i in range(10)]
    best = _csv(run_dir / "metrics.csv")[summary["best_epoch"] - 1]
    mean_f1 = sum(float(r["f1"]) for r in per_class) / 10
    assert mean_f1 == pytest.approx(float(best["val/f1_macro"]), abs=1e-5)
    assert sum(int(r["support"]) for r in per_class) == 360
    log_text = (run_dir / "train.log").read_text()
    assert "epoch 1/2" in log_text and "epoch 2/2" in log_text and "samples/s" in log_text


def test_validation_collector_confusion_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    collector = ValidationCollector(max_images=5)
    all_out, all_t = [], []
    for _ in range(3):
        images, out, t = torch.rand(16, 1, 8, 8, generator=g), torch.randn(16, 4, generator=g), \
            torch.randint(0, 4, (16,), generator=g)
        collector.update(images, out, t)
        all_out.append(out)
        all_t.append(t)
    [sample] = collector.result()
    preds, targets = torch.cat(all_out).argmax(1), torch.cat(all_t)
    assert sample.confusion().tolist() == confusion_matrix(targets, preds, labels=range(4)).tolist()
    assert len(sample.images) == 5 and bool((sample.image_preds != sample.image_targets).all())
    # Not single-label classification (regression outputs): nothing is gathered.
    other = ValidationCollector(max_images=5)
    other.update(torch.rand(4, 3), torch.randn(4), torch.randn(4))
    assert other.result() == []
    # Flat inputs: predictions are gathered, no images drawn.
    flat = ValidationCollector(max_images=5)
    flat.update(torch.rand(16, 64), torch.randn(16, 4), torch.randint(0, 4, (16,)))
    [only] = flat.result()
    assert only.images is None and len(only.preds) == 16


@pytest.mark.slow
def test_report_compares_runs_and_console_output(tmp_path):
    runs = []
    for lr, quiet in ((0.01, False), (0.003, True)):
        cfg = small_config(tmp_path, name=f"lr{lr}", optimizer={"type": "Adam", "args": {"lr": lr}},
                           logging={"progress": True, "tensorboard": False})
        proc = kiln("train", *(["-q"] if quiet else []), "-c", str(write_config(tmp_path, cfg, f"{lr}.yaml")),
                    check=True)
        if quiet:
            assert "epoch 1/2" not in proc.stderr
        else:  # off a terminal: one plain line per epoch, no progress bar
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("epoch ")]
            assert len(lines) == 2 and "samples/s" in lines[0] and "\r" not in proc.stderr
        runs.append(next((tmp_path / "runs" / f"lr{lr}").iterdir()))
    # The second run "in progress": no summary.json yet.
    (runs[1] / "summary.json").unlink()
    out_dir = tmp_path / "report"
    proc = kiln("report", str(runs[0]), str(runs[1]), "-o", str(out_dir), check=True)
    table = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.strip()}
    assert table["optimizer.args.lr"] == ["0.01", "0.003"]
    assert table["name"] == ["lr0.01", "lr0.003"]
    assert "seed" not in table and "model.type" not in table  # equal keys are not shown
    assert table["status"] == ["finished", "in", "progress"]
    best = [float(r["val/accuracy"]) for r in _csv(runs[0] / "metrics.csv")]
    assert f"{max(best):.4g}" == table["best"][1]
    with Image.open(out_dir / "curves.png") as im:
        im.verify()
    page = (out_dir / "index.html").read_text()
    assert "data:image/png;base64," in page and "optimizer.args.lr" in page

    bad = kiln("report", str(tmp_path), "-o", str(out_dir))
    assert bad.returncode == 2 and "not a run directory" in bad.stderr


@pytest.mark.slow
def test_wandb_offline_run_writes_its_directory(tmp_path):
    pytest.importorskip("wandb")
    cfg = small_config(tmp_path, logging={"progress": False, "tensorboard": False,
                                          "wandb": {"project": "kiln-test", "mode": "offline"}})
    # Offline with every proxy pointing nowhere: any network use would fail the run.
    dead = "http://127.0.0.1:9"
    env = {"WANDB_MODE": "offline", "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "https_proxy": dead,
           "http_proxy": dead, "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wbcfg")}
    kiln("train", "-q", "-c", str(write_config(tmp_path, cfg)), env=env, check=True)
    run_dir = next((tmp_path / "runs" / "t").iterdir())
    run_id = (run_dir / "wandb-run-id").read_text().strip()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1
    assert (offline[0] / f"run-{run_id}.wandb").stat().st_size > 1000
    media = {p.name.rsplit("_", 2)[0] for p in (offline[0] / "files" / "media" / "images" / "val").iterdir()}
    assert media == {"confusion_matrix", "misclassified"}


@pytest.mark.slow
def test_wandb_shows_detection_boxes_as_its_own_overlays(tmp_path, monkeypatch):
    """Detection validation images go to W&B with its box overlays: the confident predictions (with
    scores) and the true boxes, captioned by class name; an offline run writes them to disk."""
    pytest.importorskip("wandb")
    from torchkiln.loggers.validation import BoxSample
    from torchkiln.loggers.wandb import WandbLogger, wandb_boxes

    pred = {"boxes": torch.tensor([[2.0, 3.0, 20.0, 21.0], [1.0, 1.0, 5.0, 5.0]]),
            "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.9, 0.1])}
    true = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]]), "labels": torch.tensor([1])}
    groups = wandb_boxes(pred, true, ["cat", "dog"])
    (box,) = groups["predictions"]["box_data"]  # the 0.1 box is below the drawn score
    assert box["position"] == {"minX": 2.0, "minY": 3.0, "maxX": 20.0, "maxY": 21.0} and box["domain"] == "pixel"
    assert box["class_id"] == 2 and box["box_caption"] == "dog 0.90" and box["scores"] == {"score": pytest.approx(0.9)}
    assert [b["box_caption"] for b in groups["ground_truth"]["box_data"]] == ["cat"]
    assert groups["predictions"]["class_labels"] == {1: "cat", 2: "dog"}

    dead = "http://127.0.0.1:9"
    for k, v in {"WANDB_MODE": "offline", "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "WANDB_SILENT": "true",
                 "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wbcfg")}.items():
        monkeypatch.setenv(k, v)
    lg = WandbLogger(tmp_path, project="kiln-test", mode="offline", class_names=["cat", "dog"])
    lg.start({"epochs": 1})
    lg.log_boxes(1, 3, BoxSample(images=[torch.rand(3, 32, 48)], predicted=[pred], true=[true]))
    lg.finish({})
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    media = offline / "files" / "media"
    assert [p.suffix for p in (media / "images" / "val").glob("boxes_*")] == [".png"]
    boxes = [json.loads(p.read_text()) for p in media.rglob("*.json") if "box" in p.name]
    captions = sorted(b["box_caption"] for f in boxes for b in f["box_data"])
    assert captions == ["cat", "dog 0.90"], [p.relative_to(media) for p in media.rglob("*")]


def test_wandb_missing_names_the_extra(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import raises ImportError
    cfg = small_config(tmp_path, logging={"wandb": {"project": "x", "mode": "offline"}})
    code, _, err = cli("train", "-q", "-c", str(write_config(tmp_path, cfg)))
    assert code == 2 and "torchkiln[wandb]" in err
    assert not (tmp_path / "runs").exists()


def test_logged_pictures_show_the_sample():
    """The per-epoch pictures (PIL, not matplotlib): every confusion cell has the colour of its
    row fraction, and each misclassified tile shows its input, scaled up pixel for pixel."""
    from torchkiln.loggers import images
    from torchkiln.loggers.validation import ValidationSample

    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 1, 0])
    inputs = torch.zeros(2, 1, 8, 8)
    inputs[0, 0, ::2, ::2] = 1.0  # a dot pattern
    inputs[1, 0, :, :4] = 5.0  # left half lit (unnormalized values are min-max scaled)
    sample = ValidationSample(preds, targets, 3, inputs, torch.tensor([1, 0]), torch.tensor([0, 2]))

    matrix = images.confusion_image(sample, None, "cm")
    assert matrix.dtype == np.uint8 and matrix.ndim == 3 and matrix.shape[2] == 3
    fractions = np.array([[3 / 4, 1 / 4, 0], [0, 1, 0], [1, 0, 0]])
    colours = images.blues(fractions)
    # Find the grid: the top-left cell's colour, then sample each cell near its corner (the counts
    # are written in the middle).
    ys, xs = np.nonzero((matrix == colours[0, 0]).all(axis=2))
    top, left = ys.min(), xs.min()
    cell = int(np.clip(640 // 3, 4, 40))
    for i in range(3):
        for j in range(3):
            assert tuple(matrix[top + i * cell + 2, left + j * cell + 2]) == tuple(colours[i, j]), (i, j)
    assert tuple(images.blues(np.array(0.0))) == (247, 251, 255)
    assert tuple(images.blues(np.array(1.0))) == (8, 48, 107)

    grid = images.misclassified_image(sample, ["zero", "one", "two"], "wrong", side=80)
    assert grid.shape[1] > 2 * 80
    tile = grid[..., 0] if grid.ndim == 3 else grid
    # Tile 0: 10x nearest-neighbour copy of the dot pattern, somewhere below its caption.
    expected = np.kron((inputs[0, 0].numpy() * 255).astype(np.uint8), np.ones((10, 10), np.uint8))
    found = [(y, x) for y in range(tile.shape[0] - 79) for x in range(0, 40)
             if (tile[y:y + 80, x:x + 80] == expected).all()]
    assert found, "the first tile is not the input scaled up"
    assert images.misclassified_image(ValidationSample(preds, targets, 3)) is None


def test_picture_cadence(monkeypatch):
    """Validation pictures: every N epochs, or (auto) as often as keeps them under 1% of the time."""
    from torchkiln.loggers import base

    clock = [0.0]
    monkeypatch.setattr(base.time, "perf_counter", lambda: clock[0])

    def drawn(cadence: base.PictureCadence, epochs: int, epoch_s: float, draw_s: float, views: int = 1,
              once_s: float = 0.0) -> list[int]:
        """`once_s`: the first drawing's one-time cost on top (the font, the PNG encoder)."""
        cadence.start(epochs)
        out = []
        for epoch in range(1, epochs + 1):
            clock[0] += epoch_s
            if cadence.due(epoch):
                for _ in range(views):  # one drawing per view (multihead: each head, the combined class)
                    with cadence.timed(epoch):
                        clock[0] += draw_s / views + (once_s / views if not out else 0.0)
                out.append(epoch)
        return out

    assert drawn(base.PictureCadence(3), 10, 1.0, 0.05) == [1, 3, 6, 9, 10]
    assert drawn(base.PictureCadence(1), 4, 1.0, 0.05) == [1, 2, 3, 4]
    # 1 s epochs, 50 ms pictures: each drawing needs 5 s of run behind it (1%); the second epoch
    # is drawn to measure a drawing's cost.
    auto = drawn(base.PictureCadence(None), 30, 1.0, 0.05)
    assert auto == [1, 2, 15, 20, 25, 30]
    # A first drawing with 0.45 s of one-time costs does not hold the next ones off (it would have
    # until epoch 100: 0.5 s of drawing is 1% of 50 s twice over).
    assert drawn(base.PictureCadence(None), 30, 1.0, 0.05, once_s=0.45) == auto
    # A first drawing cheaper than the later ones (10 ms, then 50 ms) is counted as it was.
    assert drawn(base.PictureCadence(None), 30, 1.0, 0.05, once_s=-0.04) == [1, 2, 11, 16, 21, 26, 30]
    # The same 50 ms in four views' drawings: an epoch's drawings are costed together.
    assert drawn(base.PictureCadence(None), 30, 1.0, 0.05, views=4) == auto
    # Long epochs: the pictures are cheap next to them, drawn every epoch.
    assert drawn(base.PictureCadence(None), 5, 60.0, 0.05) == [1, 2, 3, 4, 5]


def test_device_stats_on_cuda_without_a_gpu(monkeypatch):
    """The CUDA numbers' logic (peak memory in MB, mean NVML utilization over the epoch's samples,
    NVML failing -> no more sampling) with torch.cuda's counters and pynvml stood in for."""
    import types

    from torchkiln.loggers.device import DeviceStats

    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 8 * 2**20)
    readings = iter([40.0, 60.0, None])

    class NVMLError(Exception):
        pass

    def utilization(handle):
        value = next(readings)
        if value is None:
            raise NVMLError("gone")
        return types.SimpleNamespace(gpu=value)

    fake = types.SimpleNamespace(nvmlInit=lambda: None, NVMLError=NVMLError,
                                 nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
                                 nvmlDeviceGetUtilizationRates=utilization)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda i: i + 2, raising=False)

    stats = DeviceStats(torch.device("cuda", 1))
    stats.epoch_start()
    stats.sample()
    stats.sample()
    assert stats._nvml == ("handle", 3)  # CUDA device 1 is NVML device 3 here
    assert stats.epoch_end() == {"memory/peak_allocated_mb": 3.0, "memory/peak_reserved_mb": 8.0,
                                 "gpu/utilization_pct": 50.0}
    stats.epoch_start()
    stats.sample()  # NVML fails: sampling stops, memory is still reported
    stats.sample()
    assert calls == ["reset", "reset"] and stats._nvml is False
    assert stats.epoch_end() == {"memory/peak_allocated_mb": 3.0, "memory/peak_reserved_mb": 8.0}
    assert DeviceStats(torch.device("cpu")).epoch_end() == {}


def test_tensorboard_logger_writes_through_tensorboards_writer_with_purge_on_resume(tmp_path):
    """TensorBoard's own writer (SummaryWriter): a resumed logger marks purge_step at the step after
    the checkpoint, and a step's scalars go in one event, read back by TensorBoard's loader."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    from torchkiln.loggers.tensorboard import TensorBoardLogger

    lg = TensorBoardLogger(tmp_path)
    lg.start({"epochs": 2}, resume_epoch=2, resume_step=6)
    lg.log_steps([(step, {"train/loss_step": step / 2, "lr/group0": 0.1}) for step in (7, 8, 9)])
    lg.finish({})
    (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    events = list(LegacyEventFileLoader(str(path)).Load())
    assert events[0].file_version == "brain.Event:2"
    purge = [e for e in events if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in purge] == [(7, 1)]  # START at purge_step
    rows = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events if e.HasField("summary")]
    assert rows == [(s, {"train/loss_step": s / 2, "lr/group0": pytest.approx(0.1)}) for s in (7, 8, 9)]
