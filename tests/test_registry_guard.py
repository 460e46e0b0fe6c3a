"""Every name torchkiln offers builds from a config on the CLI path, in a fresh `kiln` process.

Two fresh processes: one imports every module of the package and lists every registry's names (all
that the package offers); the other goes through the CLI first (`kiln config check`), lists the
names as the CLI path sees them, which must be the same (a name registered only by a module the CLI
never imports fails here, as FocalLoss once did), and then checks one config per name: datasets,
models, losses, metrics (for each task kind they apply to), tasks, optimizers, schedulers,
transforms, samplers and collates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, small_config

pytestmark = pytest.mark.slow
DRIVER = str(Path(__file__).with_name("registry_driver.py"))

# Arguments for the names that need some (everything else builds with none).
LOSS_ARGS: dict[str, dict] = {}
LOSS_TASK = {  # the task whose outputs and targets each loss takes (classification otherwise)
    **dict.fromkeys(["L1Loss", "MSELoss", "HuberLoss", "SmoothL1Loss", "PoissonNLLLoss", "HingeEmbeddingLoss"],
                    "regression"),
    **dict.fromkeys(["BCELoss", "BCEWithLogitsLoss", "MultiLabelSoftMarginLoss", "SoftMarginLoss", "KLDivLoss"],
                    "multilabel"),
    "ListNetLoss": "ranking",
}
SIGMOID_MODEL = (  # a user's module beside the configs: probabilities out, for BCELoss
    "import torch\n\n\n"
    "class SigmoidMLP(torch.nn.Sequential):\n"
    "    def __init__(self, num_classes: int = 10):\n"
    "        super().__init__(torch.nn.Flatten(), torch.nn.Linear(64, num_classes), torch.nn.Sigmoid())\n"
)
SCHEDULER_ARGS = {
    "StepLR": {"step_size": 1}, "MultiStepLR": {"milestones": [1]}, "ExponentialLR": {"gamma": 0.9},
    "CosineAnnealingLR": {"T_max": 2}, "CosineAnnealingWarmRestarts": {"T_0": 1},
    "CyclicLR": {"base_lr": 0.001, "max_lr": 0.01, "cycle_momentum": False}, "OneCycleLR": {"max_lr": 0.01},
    "LambdaLR": {"lr_lambda": "math:exp"}, "MultiplicativeLR": {"lr_lambda": "math:cos"},
    "SequentialLR": {"schedulers": [{"type": "LinearLR", "args": {"total_iters": 1}},
                                    {"type": "ExponentialLR", "args": {"gamma": 0.9}}], "milestones": [1]},
    "ChainedScheduler": {"schedulers": [{"type": "ConstantLR"}, {"type": "ExponentialLR", "args": {"gamma": 0.9}}]},
}
TRANSFORM_ARGS = {
    "ElasticTransform": {"sigma": 1.0}, "Grayscale": {"num_output_channels": 3},
    "CenterCrop": {"size": 8}, "RandomCrop": {"size": 8}, "RandomResizedCrop": {"size": 8}, "Resize": {"size": 8},
    "FiveCrop": {"size": 4}, "TenCrop": {"size": 4}, "Pad": {"padding": 1}, "GaussianBlur": {"kernel_size": 3},
    "Normalize": {"mean": [0.5], "std": [0.25]}, "RandomAffine": {"degrees": 10}, "RandomRotation": {"degrees": 10},
    "RandomAdjustSharpness": {"sharpness_factor": 2}, "RandomPosterize": {"bits": 4},
    "RandomSolarize": {"threshold": 0.5}, "RandomResize": {"min_size": 6, "max_size": 10},
    "RandomShortestSize": {"min_size": 8}, "ScaleJitter": {"target_size": [8, 8]}, "JPEG": {"quality": 90},
    "ToDtype": {"dtype": "float32"}, "ConvertImageDtype": {"dtype": "float32"},
    "RandomApply": {"transforms": [{"type": "RandomInvert"}]}, "RandomChoice": {"transforms": [{"type": "RandomInvert"}]},
    "RandomOrder": {"transforms": [{"type": "RandomInvert"}]}, "Compose": {"transforms": [{"type": "RandomInvert"}]},
    "Lambda": {"lambd": "torch:neg"}, "UniformTemporalSubsample": {"num_samples": 2},
    "ConvertBoundingBoxFormat": {"format": "XYXY"}, "LinearTransformation": {
        "transformation_matrix": np.eye(48).tolist(), "mean_vector": [0.0] * 48},  # 3 x 4 x 4 inputs
    "CutMix": {"num_classes": 10}, "MixUp": {"num_classes": 10}, "SetClampingMode": {"clamping_mode": "soft"},
}
TASK_DATA = {  # a data set of each task kind
    "classification": {"type": "Digits"}, "multilabel": {"type": "DigitsMultiLabel"},
    "regression": {"type": "DigitsRegression"}, "ranking": {"type": "DigitsRanking"},
}
DETECTION_DATA = ("COCODetection", "CSVBoxes", "ShapesDetection")
DETECTOR = {"type": "fasterrcnn_mobilenet_v3_large_320_fpn", "args": {"min_size": 64, "max_size": 64}}
KIND_TASK = {"multiclass": "classification", "multilabel": "multilabel", "regression": "regression",
             "ranking": "ranking"}
MULTIHEAD = {"type": "multihead", "args": {"heads": {"mod3": 3, "parity": 2, "quarter": 3}}}  # DigitsMultiHead
IMAGES_CNN = {"type": "SmallCNN", "args": {"in_channels": 3, "width": 8}}


def _files(tmp: Path) -> dict[str, dict]:
    """Small data on disk for the file-backed datasets."""
    (tmp / "guard_models.py").write_text(SIGMOID_MODEL)
    rng = np.random.default_rng(0)
    for split_class in ("a", "b"):
        (tmp / "folder" / split_class).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp / "folder" / split_class / f"{i}.png")
    rows = ["image,label"] + [f"folder/{c}/{i}.png,{c}" for c in ("a", "b") for i in range(6)]
    (tmp / "images.csv").write_text("\n".join(rows) + "\n")
    np.savez(tmp / "data.npz", x=np.random.default_rng(0).normal(size=(40, 4)).astype("float32"),
             y=np.arange(40) % 2)
    shapes = tmp / "shapes"  # the detection demo, small: COCO JSON + images, and the same boxes as a CSV
    subprocess.run([sys.executable, "-m", "torchkiln", "data", "shapes", str(shapes), "--images", "12",
                    "--size", "64"], check=True, capture_output=True, env={"PYTHONPATH": str(ROOT / "src")})
    ann = json.loads((shapes / "annotations.json").read_text())
    names = {i["id"]: i["file_name"] for i in ann["images"]}
    box_rows = ["image,x1,y1,x2,y2,label"] + [
        f"{names[a['image_id']]},{a['bbox'][0]},{a['bbox'][1]},{a['bbox'][0] + a['bbox'][2]},"
        f"{a['bbox'][1] + a['bbox'][3]},{a['category_id']}" for a in ann["annotations"] if a["image_id"] in names]
    (tmp / "boxes.csv").write_text("\n".join(box_rows) + "\n")
    return {
        "COCODetection": {"annotations": str(shapes / "annotations.json"), "images": str(shapes / "images")},
        "CSVBoxes": {"csv": str(tmp / "boxes.csv"), "images": str(shapes / "images")},
        "ShapesDetection": {"root": str(shapes), "images": 12, "size": 64},  # what the folder was made with
        "ImageFolder": {"root": str(tmp / "folder")},
        "CsvImages": {"csv_file": str(tmp / "images.csv")},
        "TensorFile": {"path": str(tmp / "data.npz")},
    }


def _cfg(tmp: Path, **sections) -> dict:
    base = small_config(tmp, model={"type": "MLP", "args": {"hidden": [8]}},
                        trainer={"epochs": 1}, logging={"progress": False})
    base["model"]["args"].pop("num_classes", None)  # from the data
    base["trainer"].pop("monitor")  # each task's default
    for key, value in sections.items():
        base[key] = value
    return base


def _configs(tmp: Path, offered: dict[str, list[str]]) -> list[tuple[str, dict]]:
    files = _files(tmp)
    out: list[tuple[str, dict]] = [("default", _cfg(tmp))]
    digits = _cfg(tmp)["data"]
    images = {**digits, "dataset": {"type": "CsvImages", "args": files["CsvImages"]}}
    tabular = {"type": "MLP", "args": {"in_features": 4, "hidden": [8]}}
    detection = {**digits, "dataset": {"type": "ShapesDetection", "args": files["ShapesDetection"]}}
    for name in offered["dataset"]:
        data = {**digits, "dataset": {"type": name, "args": files.get(name, {})}}
        if name in DETECTION_DATA:
            out.append((f"dataset {name}", _cfg(tmp, data=data, task="detection", model=DETECTOR, metrics=[])))
            continue
        task = {"DigitsMultiLabel": "multilabel", "DigitsRegression": "regression", "DigitsRanking": "ranking",
                "DigitsMultiHead": MULTIHEAD}.get(name, "classification")
        model = IMAGES_CNN if name in ("CsvImages", "ImageFolder") else tabular if name == "TensorFile" else None
        extra = {"model": model} if model else {}
        out.append((f"dataset {name}", _cfg(tmp, data=data, task=task, metrics=[], **extra)))
    from torchkiln.models.detection import DETECTORS

    for name in offered["model"]:
        if name in DETECTORS:  # 64-px inputs: the config check's probe runs the detector once
            args = {} if name.startswith("ssdlite") else {"min_size": 64, "max_size": 64}
            out.append((f"model {name}", _cfg(tmp, model={"type": name, "args": args}, task="detection",
                                              data=detection, metrics=[])))
            continue
        out.append((f"model {name}", _cfg(tmp, model={"type": name})))
    out.append(("model timm:resnet18", _cfg(tmp, model={"type": "timm:resnet18", "args": {"in_chans": 1}})))
    out.append(("model torchvision:resnet18", _cfg(tmp, model={"type": "torchvision:resnet18"}, data=images)))
    for name in offered["loss"]:
        task = LOSS_TASK.get(name, "classification")
        extra = {"model": {"type": "guard_models:SigmoidMLP"}} if name == "BCELoss" else {}
        out.append((f"loss {name}", _cfg(tmp, loss={"type": name, "args": LOSS_ARGS.get(name, {})}, task=task,
                                         data={**digits, "dataset": TASK_DATA[task]}, metrics=[], **extra)))
    for name in offered["optimizer"]:
        out.append((f"optimizer {name}", _cfg(tmp, optimizer={"type": name, "args": {"lr": 0.01}})))
    for name in offered["scheduler"]:
        out.append((f"scheduler {name}", _cfg(tmp, scheduler={"type": name, "args": SCHEDULER_ARGS.get(name, {})})))
    from torchkiln.metrics import _TABLE  # the task kinds each metric name is registered for

    two_classes = {"type": "TensorFile", "args": files["TensorFile"]}
    for name in offered["metric"]:
        for kind in _TABLE[name]:
            task = KIND_TASK[kind]
            binary = name in ("f1", "precision", "recall")  # the binary scores: a two-class data set
            data = {**digits, "dataset": two_classes if binary else TASK_DATA[task]}
            extra = {"model": tabular} if binary else {}
            out.append((f"metric {name} ({task})", _cfg(tmp, task=task, data=data, metrics=[name], **extra)))
    for name in offered["task"]:
        if name == "detection":
            out.append(("task detection", _cfg(tmp, task=name, data=detection, model=DETECTOR, metrics=[])))
        elif name == "multihead":
            data = {**digits, "dataset": {"type": "DigitsMultiHead"}}
            out.append(("task multihead", _cfg(tmp, task=MULTIHEAD, data=data, metrics=[])))
        else:
            out.append((f"task {name}", _cfg(tmp, task=name, data={**digits, "dataset": TASK_DATA[name]}, metrics=[])))
    for name in offered["transform"]:  # on decoded images, then to one size so that they batch
        size = 4 if name == "LinearTransformation" else 16
        steps = [{"type": "Resize", "args": {"size": size}}, {"type": "CenterCrop", "args": {"size": size}}]
        step = {"type": name, "args": TRANSFORM_ARGS.get(name, {})}
        steps = steps + [step] if name == "LinearTransformation" else [step, *steps]
        data = {**images, "transforms": {"train": steps, "eval": []}}
        out.append((f"transform {name}", _cfg(tmp, data=data, model=IMAGES_CNN)))
    for name in offered["collate"]:
        if name == "detection":
            out.append((f"collate {name}", _cfg(tmp, data={**detection, "collate": {"type": name}},
                                                task="detection", model=DETECTOR, metrics=[])))
            continue
        out.append((f"collate {name}", _cfg(tmp, data={**digits, "collate": {"type": name}})))
    for name in ("default", "balanced"):
        out.append((f"sampler {name}", _cfg(tmp, data={**digits, "sampler": name})))
    # Names of torch's and torchvision's that cannot work from a config: refused, saying why.
    from torchkiln.data.transforms import NOT_PER_SAMPLE
    from torchkiln.registry import LOSSES, OPTIMIZERS

    for name in LOSSES.unavailable:
        out.append((f"refused loss {name}", _cfg(tmp, loss={"type": name})))
    for name in OPTIMIZERS.unavailable:
        out.append((f"refused optimizer {name}", _cfg(tmp, optimizer={"type": name, "args": {"lr": 0.01}})))
    for name in NOT_PER_SAMPLE:
        out.append((f"refused transform {name}", _cfg(tmp, data={**digits, "transforms": {"train": [{"type": name}]}})))
    return out


def test_every_offered_name_builds_from_a_config_on_the_cli_path(tmp_path):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    listed = subprocess.run([sys.executable, DRIVER, "names"], capture_output=True, text=True, env=env,
                            timeout=300, check=True)
    offered = json.loads(listed.stdout.strip().splitlines()[-1])
    configs = []
    for i, (label, cfg) in enumerate(_configs(tmp_path, offered)):
        path = tmp_path / f"c{i:03d}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        configs.append({"label": label, "path": str(path)})
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    proc = subprocess.run([sys.executable, DRIVER, "cli", str(tmp_path / "names.json"), str(tmp_path / "configs.json")],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    on_cli_path = json.loads((tmp_path / "names.json").read_text())
    for kind, names in offered.items():
        missing = sorted(set(names) - set(on_cli_path.get(kind, [])))
        assert not missing, f"{kind} names registered only off the CLI path: {missing}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [f"{c['label']}: {r['code']} {r['error']}" for c, r in zip(configs, results)
              if r["code"] != 0 and not c["label"].startswith("refused ")]
    assert not failed, "\n".join(failed)
    refused = [(c, r) for c, r in zip(configs, results) if c["label"].startswith("refused ")]
    for c, r in refused:
        assert r["code"] == 2 and "cannot be" in r["error"] and "\n" not in r["error"], (c["label"], r)
    assert len(results) - len(refused) > 160 and len(refused) >= 15
