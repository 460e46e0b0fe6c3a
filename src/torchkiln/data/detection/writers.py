"""Detection predictions as files: boxes as CSV (image, x1, y1, x2, y2, label, score) and a COCO
results JSON ([{image_id, category_id, bbox: [x, y, w, h], score}], the file pycocotools' loadRes
and faster-coco-eval read). Boxes are in the stored image's pixels, whatever the eval transforms
resized."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


def predict_detections(trainer: Any, loader: Iterable, score_threshold: float = 0.0) -> list[dict[str, Any]]:
    """One record per image: image_id, file, and its boxes (N, 4) XYXY, labels (N,), scores (N,),
    through the Trainer's one forward pass."""
    from torchkiln.data.wrappers import has_attr, unwrap

    base, _ = unwrap(loader.dataset, has_attr("audit_report"))  # type: ignore[attr-defined]
    imgs = base.coco.coco.imgs
    records = []
    for batch, outputs, _ in trainer.forward_pass(loader):
        images, targets = batch[0], batch[1]
        for image, target, det in zip(images, targets, outputs["detections"]):
            info = imgs[int(target["image_id"])]
            keep = det["scores"] >= score_threshold
            sx, sy = info["width"] / image.shape[-1], info["height"] / image.shape[-2]
            boxes = det["boxes"][keep].float().cpu() * torch.tensor([sx, sy, sx, sy])
            records.append({"image_id": int(target["image_id"]), "file": info["file_name"], "boxes": boxes,
                            "labels": det["labels"][keep].cpu(), "scores": det["scores"][keep].float().cpu()})
    return records


def box_rows(record: dict[str, Any], class_names: list[str] | None = None) -> list[list[Any]]:
    """An image's rows: file, x1, y1, x2, y2, label (the class name: labels 1..C are
    class_names[0..C-1]), score."""
    rows = []
    for box, label, score in zip(record["boxes"].tolist(), record["labels"].tolist(), record["scores"].tolist()):
        name = class_names[label - 1] if class_names and 1 <= label <= len(class_names) else label
        rows.append([record["file"], *(f"{v:.2f}" for v in box), name, f"{score:.4f}"])
    return rows


def write_boxes_csv(records: list[dict[str, Any]], path: str | Path, class_names: list[str] | None = None) -> int:
    """One row per box (`box_rows`). Rows written."""
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "x1", "y1", "x2", "y2", "label", "score"])
        for r in records:
            lines = box_rows(r, class_names)
            w.writerows(lines)
            rows += len(lines)
    return rows


def coco_results(records: list[dict[str, Any]], category_ids: list[int] | None) -> list[dict[str, Any]]:
    """COCO results entries; label i is category_ids[i - 1] (None: the label itself)."""
    out = []
    for r in records:
        for (x1, y1, x2, y2), label, score in zip(r["boxes"].tolist(), r["labels"].tolist(), r["scores"].tolist()):
            category = int(category_ids[label - 1]) if category_ids is not None else int(label)
            out.append({"image_id": r["image_id"], "category_id": category,
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "score": round(score, 5)})
    return out


def write_coco_results(records: list[dict[str, Any]], path: str | Path, category_ids: list[int] | None) -> int:
    results = coco_results(records, category_ids)
    Path(path).write_text(json.dumps(results), encoding="utf-8")
    return len(results)
