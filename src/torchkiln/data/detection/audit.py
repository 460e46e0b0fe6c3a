"""The annotation audit: every fault of a COCO-format annotation set counted, with examples, and a
corrected copy (the input is never changed).

Faults of a box: inverted corners (a negative width or height), partly outside the image (clipped)
or wholly outside (dropped), a side below `min_size`, NaN or infinite coordinates, an image id
with no image entry, an unknown category id, a duplicate annotation id. Faults of an image: a
missing or unreadable file, a size in the JSON that disagrees with the file. Images without
annotations are reported and kept: they are negatives, not faults.

A CSV of (image, x1, y1, x2, y2, label) rows goes through the same checks: it is read into the
same dictionary (`csv_to_coco`), where x1 > x2 is a negative width.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchkiln.errors import DataError

# fault kind -> what the table says about it, and whether a corrected file still holds such boxes
FAULTS = {
    "inverted": "inverted corners (negative width/height, or x1 > x2)",
    "partly_outside": "boxes partly outside the image (clipped)",
    "wholly_outside": "boxes wholly outside the image (dropped)",
    "tiny": "zero or tiny boxes, a side below min_size (dropped)",
    "non_finite": "NaN or infinite coordinates (dropped)",
    "orphan_image_id": "image ids with no image entry (dropped)",
    "unknown_category": "unknown category ids (dropped)",
    "duplicate_id": "duplicate annotation ids (later ones dropped)",
    "missing_image": "image files missing or unreadable (image dropped)",
    "size_mismatch": "image sizes in the JSON that disagree with the file (file size used)",
}
EXAMPLES = 5  # examples listed per fault kind


@dataclass
class AuditReport:
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    images: int = 0
    annotations: int = 0
    kept_images: int = 0
    kept_annotations: int = 0
    fixed: int = 0  # boxes kept after a repair (corners put in order, clipped)
    dropped: int = 0  # boxes removed
    without_annotations: list[Any] = field(default_factory=list)  # image ids, kept

    def add(self, kind: str, **example: Any) -> None:
        self.counts[kind] += 1
        held = self.examples.setdefault(kind, [])
        if len(held) < EXAMPLES:
            held.append(example)

    @property
    def faults(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images, "annotations": self.annotations,
            "faults": {k: int(self.counts.get(k, 0)) for k in FAULTS}, "total_faults": self.faults,
            "images_without_annotations": len(self.without_annotations),
            "examples": self.examples, "kept_images": self.kept_images,
            "kept_annotations": self.kept_annotations, "boxes_fixed": self.fixed, "boxes_dropped": self.dropped,
        }

    def table(self) -> str:
        width = max(len(v) for v in FAULTS.values())
        lines = [f"{self.images} images, {self.annotations} annotations; {self.faults} faults"]
        for kind, what in FAULTS.items():
            lines.append(f"  {what:<{width}}  {self.counts.get(kind, 0)}")
            for ex in self.examples.get(kind, []):
                lines.append("      " + ", ".join(f"{k} {v}" for k, v in ex.items()))
        lines.append(f"  {'images with no annotations (kept)':<{width}}  {len(self.without_annotations)}")
        lines.append(f"kept {self.kept_images} images, {self.kept_annotations} annotations"
                     f" ({self.fixed} boxes fixed, {self.dropped} dropped)")
        return "\n".join(lines)


@dataclass(frozen=True)
class Policy:
    """inverted: fix (corners put in order) or drop; clip: clip boxes partly outside (else drop
    them); min_size: boxes with a side below it are dropped."""

    inverted: str = "fix"
    clip: bool = True
    min_size: float = 1.0


def read_annotations(path: str | Path) -> dict[str, Any]:
    """A COCO JSON, or a CSV of boxes (csv_to_coco); an unreadable file is a one-line DataError."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return csv_to_coco(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the annotations ({type(exc).__name__}: {exc});"
                        " give a COCO-format JSON file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: not COCO-format annotations (need 'images' and 'annotations' lists)")
    data.setdefault("categories", [])
    return data


CSV_COLUMNS = ("image", "x1", "y1", "x2", "y2", "label")


def csv_to_coco(path: Path) -> dict[str, Any]:
    """Rows (image, x1, y1, x2, y2, label) -> a COCO dict; image sizes are read from the files
    later (width/height None); categories are the labels in sorted order, ids from 1."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the boxes ({type(exc).__name__}: {exc})") from None
    missing = [c for c in CSV_COLUMNS if rows and c not in rows[0]]
    if missing or not rows:
        raise DataError(f"{path}: a boxes CSV needs the columns {', '.join(CSV_COLUMNS)}"
                        f"{' (missing: ' + ', '.join(missing) + ')' if missing else ' and at least one row'}")
    labels = sorted({r["label"] for r in rows})
    cat = {name: i + 1 for i, name in enumerate(labels)}
    images: dict[str, int] = {}
    anns = []
    for i, r in enumerate(rows):
        image_id = images.setdefault(r["image"], len(images) + 1)
        try:
            x1, y1, x2, y2 = (float(r[k]) for k in ("x1", "y1", "x2", "y2"))
        except ValueError:
            raise DataError(f"{path}: row {i + 2}: coordinates must be numbers; found"
                            f" {[r[k] for k in ('x1', 'y1', 'x2', 'y2')]}") from None
        anns.append({"id": i + 1, "image_id": image_id, "category_id": cat[r["label"]],
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0})
    return {"images": [{"id": i, "file_name": f, "width": None, "height": None} for f, i in images.items()],
            "annotations": anns, "categories": [{"id": i, "name": n} for n, i in cat.items()]}


def coco_to_csv(data: dict[str, Any], path: Path) -> None:
    """The inverse of csv_to_coco (images without boxes have no row)."""
    files = {im["id"]: im["file_name"] for im in data["images"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for a in data["annotations"]:
            x, y, bw, bh = a["bbox"]
            w.writerow([files[a["image_id"]], _num(x), _num(y), _num(x + bw), _num(y + bh), names[a["category_id"]]])


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, or None when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def audit(data: dict[str, Any], images_dir: str | Path | None, policy: Policy = Policy(), where: str = "images"
          ) -> tuple[AuditReport, dict[str, Any]]:
    """(report, corrected copy) of COCO-format `data`; `images_dir` None skips the file checks. A
    folder that is not there is a DataError naming it as `where` (the flag or argument that gave it),
    not a missing file per image."""
    if images_dir is not None and not Path(images_dir).is_dir():
        found = "not a folder" if Path(images_dir).exists() else "folder not found"
        raise DataError(f"{where} {images_dir}: {found}; give the folder that holds the annotations' images")
    report = AuditReport(images=len(data["images"]), annotations=len(data["annotations"]))
    images = _check_images(data["images"], images_dir, report)
    categories = {c.get("id") for c in data["categories"]}
    seen: set[Any] = set()
    kept = []
    for ann in data["annotations"]:
        fixed = _check_annotation(ann, images, categories, seen, report, policy)
        if fixed is not None:
            kept.append(fixed)
    out = copy.deepcopy({k: v for k, v in data.items() if k not in ("images", "annotations")})
    out["images"] = [im for im in images.values() if im is not None]
    out["annotations"] = [a for a in kept if images.get(a["image_id"]) is not None]
    report.dropped += len(kept) - len(out["annotations"])
    with_boxes = {a["image_id"] for a in out["annotations"]}
    report.without_annotations = [im["id"] for im in out["images"] if im["id"] not in with_boxes]
    report.kept_images, report.kept_annotations = len(out["images"]), len(out["annotations"])
    return report, out


def _check_images(entries: list[dict[str, Any]], images_dir: str | Path | None, report: AuditReport
                  ) -> dict[Any, dict[str, Any] | None]:
    """image id -> its (corrected) entry, or None when its file is missing or unreadable."""
    images: dict[Any, dict[str, Any] | None] = {}
    for entry in entries:
        im = dict(entry)
        if images_dir is not None:
            size = image_size(Path(images_dir) / str(im.get("file_name", "")))
            if size is None:
                report.add("missing_image", image=im.get("id"), file=im.get("file_name"))
                images[im.get("id")] = None
                continue
            if im.get("width") is not None and (im.get("width"), im.get("height")) != size:
                report.add("size_mismatch", image=im.get("id"), json=[im.get("width"), im.get("height")],
                           file=list(size))
            im["width"], im["height"] = size
        images[im.get("id")] = im
    return images


def _check_annotation(ann: dict[str, Any], images: dict[Any, Any], categories: set[Any], seen: set[Any],
                      report: AuditReport, policy: Policy) -> dict[str, Any] | None:
    """The annotation as kept (corners ordered, clipped), or None when it is dropped."""
    aid, image_id, box = ann.get("id"), ann.get("image_id"), ann.get("bbox")
    where = {"annotation": aid, "image": image_id, "box": box}
    drop = False
    if aid in seen:
        report.add("duplicate_id", **where)
        drop = True
    seen.add(aid)
    if image_id not in images:
        report.add("orphan_image_id", **where)
        drop = True
    if ann.get("category_id") not in categories:
        report.add("unknown_category", **where, category=ann.get("category_id"))
        drop = True
    if not (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
        report.add("non_finite", **where)
        report.dropped += 1
        return None
    x, y, w, h = (float(v) for v in box)
    repaired = False
    if w < 0 or h < 0:
        report.add("inverted", **where)
        drop = drop or policy.inverted == "drop"
        x, w = (x + w, -w) if w < 0 else (x, w)
        y, h = (y + h, -h) if h < 0 else (y, h)
        repaired = True
    image = images.get(image_id)
    if image is not None and image.get("width") is not None:
        x, y, w, h, state = _clip(x, y, w, h, float(image["width"]), float(image["height"]))
        if state == "outside":
            report.add("wholly_outside", **where)
            drop = True
        elif state == "partly":
            report.add("partly_outside", **where)
            drop = drop or not policy.clip
            repaired = True
    if not drop and (w < policy.min_size or h < policy.min_size):
        report.add("tiny", **where)
        drop = True
    if drop:
        report.dropped += 1
        return None
    report.fixed += int(repaired)
    return {**ann, "bbox": [x, y, w, h], "area": w * h}


def _clip(x: float, y: float, w: float, h: float, width: float, height: float
          ) -> tuple[float, float, float, float, str]:
    """The box clipped to the image, and whether it was inside, partly or wholly outside."""
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if x1 >= x2 or y1 >= y2:
        if w > 0 and h > 0:
            return x, y, w, h, "outside"
        # a degenerate box on the image is tiny, not outside
        inside = 0 <= x <= width and 0 <= y <= height
        return x, y, w, h, "inside" if inside else "outside"
    state = "inside" if (x1, y1, x2, y2) == (x, y, x + w, y + h) else "partly"
    return x1, y1, x2 - x1, y2 - y1, state


def policy_for(on_invalid: str, min_size: float) -> Policy:
    """`data.boxes.on_invalid`: fix (order corners, clip) or drop (every faulty box); error raises."""
    return Policy(inverted="drop" if on_invalid == "drop" else "fix", clip=on_invalid != "drop",
                  min_size=float(min_size))


def write_annotations(data: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        coco_to_csv(data, path)
    else:
        path.write_text(json.dumps(data), encoding="utf-8")
