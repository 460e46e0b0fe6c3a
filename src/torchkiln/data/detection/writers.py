"""Detection predictions as files (for `kiln predict`'s DetectionWriter): boxes as CSV rows (image,
x1, y1, x2, y2, label, score) and a COCO results JSON ([{image_id, category_id, bbox: [x, y, w, h],
score}], the file pycocotools' loadRes and faster-coco-eval read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def box_rows(record: dict[str, Any], class_names: list[str] | None = None) -> list[list[Any]]:
    """An image's rows: file, x1, y1, x2, y2, label (the class name: labels 1..C are
    class_names[0..C-1]), score."""
    rows = []
    for box, label, score in zip(record["boxes"].tolist(), record["labels"].tolist(), record["scores"].tolist()):
        name = class_names[label - 1] if class_names and 1 <= label <= len(class_names) else label
        rows.append([record["file"], *(f"{v:.2f}" for v in box), name, f"{score:.4f}"])
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
