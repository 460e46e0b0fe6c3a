"""`kiln data stats` for detection data: boxes per image, box sizes and class counts (box counts),
read from the audited annotations without decoding an image."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset


def detection_stats(dataset: Dataset, class_names: list[str] | None) -> dict[str, Any]:
    from torchkiln.data.stats import class_summary
    from torchkiln.data.wrappers import has_attr, unwrap

    base, index = unwrap(dataset, has_attr("audit_report"))
    positions = index if index is not None else np.arange(len(base))  # type: ignore[arg-type]
    labels = base.box_labels()
    labels = [labels[int(i)] for i in positions]
    per_image = np.array([len(t) for t in labels], dtype=np.int64)
    counts = np.bincount(np.concatenate([t.numpy() for t in labels] + [np.zeros(0, np.int64)]) - 1
                         if sum(per_image) else np.zeros(0, np.int64), minlength=base.num_classes)
    ids = {base.ids[int(i)] for i in positions}
    anns = [a for a in base.coco.coco.dataset["annotations"] if a["image_id"] in ids]
    sizes = np.array([a["bbox"][2:] for a in anns], dtype=np.float64).reshape(-1, 2)
    out: dict[str, Any] = {"samples": int(len(positions)), "boxes": int(per_image.sum())}
    out["boxes_per_image"] = {"mean": round(float(per_image.mean()), 3) if len(per_image) else 0.0,
                              "min": int(per_image.min(initial=0)), "max": int(per_image.max(initial=0)),
                              "images_without_boxes": int((per_image == 0).sum())}
    if len(sizes):
        q = [0, 25, 50, 75, 100]
        out["box_sizes"] = {"width": [round(float(v), 1) for v in np.percentile(sizes[:, 0], q)],
                            "height": [round(float(v), 1) for v in np.percentile(sizes[:, 1], q)],
                            "area_sqrt_median": round(float(np.median(np.sqrt(sizes.prod(1)))), 1)}
    out.update(class_summary(counts, class_names))
    return out


def format_detection_stats(stats: dict[str, Any]) -> list[str]:
    b = stats["boxes_per_image"]
    lines = [f"boxes              {stats['boxes']} ({b['mean']} per image, min {b['min']}, max {b['max']};"
             f" {b['images_without_boxes']} images without boxes)"]
    if "box_sizes" in stats:
        s = stats["box_sizes"]
        lines.append(f"box width  (min/25%/50%/75%/max)  {s['width']}")
        lines.append(f"box height (min/25%/50%/75%/max)  {s['height']}")
    return lines
