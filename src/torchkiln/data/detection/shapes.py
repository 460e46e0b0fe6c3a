"""The embedded detection demo: rectangles, ellipses and triangles on noise, written as COCO JSON
with PNG images, carrying a known share of injected annotation faults for `kiln data check`.

`make_shapes(out)` writes `out/images/*.png`, `out/annotations.json` and `out/faults.json` (what
was injected, by fault kind, so the audit's counts can be compared with it). Seeded: the same
arguments give the same files, and annotations.json records them (`info.made_with`: images, size,
seed; `made_with(data)` reads them back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CATEGORIES = ["rectangle", "ellipse", "triangle"]


def _draw(draw: Any, kind: str, x1: int, y1: int, x2: int, y2: int, color: tuple[int, int, int]) -> None:
    if kind == "rectangle":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=color)
    elif kind == "ellipse":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=color)
    else:
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2) // 2, y1)], fill=color)


def _image(rng: np.random.Generator, size: int, shapes: int, edge: bool
           ) -> tuple[Any, list[tuple[int, list[float]]]]:
    """An image of noise with `shapes` shapes; with `edge`, the first one runs off the left edge
    (its box, as annotated, extends past the image)."""
    from PIL import Image, ImageDraw

    noise = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
    im = Image.fromarray(noise)
    draw = ImageDraw.Draw(im)
    boxes = []
    for i in range(shapes):
        cat = int(rng.integers(len(CATEGORIES)))
        w, h = (int(v) for v in rng.integers(size // 6, size // 2.5, size=2))
        x1 = -w // 3 if edge and i == 0 else int(rng.integers(0, size - w))
        y1 = int(rng.integers(0, size - h))
        color = tuple(int(c) for c in rng.integers(140, 256, size=3))
        _draw(draw, CATEGORIES[cat], x1, y1, x1 + w, y1 + h, color)
        boxes.append((cat + 1, [float(x1), float(y1), float(w), float(h)]))
    return im, boxes


# each fault kind injected into every `FAULT_EVERY`-th image (offset by its position in the list)
FAULT_KINDS = ["inverted", "partly_outside", "wholly_outside", "tiny", "non_finite", "unknown_category",
               "duplicate_id", "orphan_image_id", "size_mismatch"]
FAULT_EVERY = 20


def settings(images: int, size: int, seed: int) -> dict[str, int]:
    """What a demo folder is made with, as annotations.json records it."""
    return {"images": images, "size": size, "seed": seed}


def made_with(data: dict[str, Any]) -> dict[str, int] | None:
    """The settings recorded in a demo's annotations (None: no record, e.g. not made here)."""
    info = data.get("info")
    return info.get("made_with") if isinstance(info, dict) else None


def make_shapes(out: str | Path, images: int = 300, size: int = 128, seed: int = 0,
                empty_share: float = 0.05) -> dict[str, Any]:
    """Write the demo data set into `out`; returns the injected faults by kind."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, anns = [], []
    injected = {k: 0 for k in [*FAULT_KINDS, "missing_image", "images_without_annotations"]}
    clean = []  # images with boxes and no fault: one of them loses its file
    for i in range(images):
        faults = {k for j, k in enumerate(FAULT_KINDS) if (i + j) % FAULT_EVERY == 0}
        empty = rng.random() < empty_share and not faults
        im, boxes = _image(rng, size, 0 if empty else int(rng.integers(1, 4)), "partly_outside" in faults)
        name = f"{i:05d}.png"
        im.save(out / "images" / name)
        entry = {"id": i + 1, "file_name": name, "width": size, "height": size}
        if "size_mismatch" in faults:
            entry["width"] = size + 16
            injected["size_mismatch"] += 1
        entries.append(entry)
        injected["images_without_annotations"] += int(empty)
        if boxes and not faults:
            clean.append(name)
        for n, (cat, box) in enumerate(boxes):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
            if n == 0:
                _inject(anns, faults, size, injected)
    if clean:
        (out / "images" / clean[-1]).unlink()  # one image entry whose file is gone
        injected["missing_image"] = 1
    data = {"info": {"description": "torchkiln's generated shapes demo (kiln data shapes)",
                     "made_with": settings(images, size, seed)},
            "images": entries, "annotations": anns,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]}
    (out / "annotations.json").write_text(json.dumps(data), encoding="utf-8")
    (out / "faults.json").write_text(json.dumps(injected, indent=2), encoding="utf-8")
    return injected


def _inject(anns: list[dict[str, Any]], faults: set[str], size: int, injected: dict[str, int]) -> None:
    """The faults of this image, on its first annotation (or as extra annotations beside it)."""
    ann = anns[-1]
    x, y, w, h = ann["bbox"]
    if "partly_outside" in faults:
        injected["partly_outside"] += 1  # drawn off the edge already
    if "inverted" in faults:
        ann["bbox"] = [x + w, y + h, -w, -h]  # (x2, y2) given first
        injected["inverted"] += 1
    extra = {
        "wholly_outside": lambda: {"bbox": [size + 10.0, 5.0, 20.0, 20.0]},
        "tiny": lambda: {"bbox": [x, y, 0.0, h]},
        "non_finite": lambda: {"bbox": [float("nan"), y, w, h]},
        "unknown_category": lambda: {"category_id": len(CATEGORIES) + 7},
        "duplicate_id": lambda: {"id": ann["id"]},
        "orphan_image_id": lambda: {"image_id": 10**6 + ann["id"]},
    }
    for kind, change in extra.items():
        if kind in faults:
            anns.append({**ann, "bbox": [x, y, w, h], "id": len(anns) + 1, **change()})
            injected[kind] += 1
