"""Detection datasets: COCO-format JSON (through torchvision's CocoDetection and
`wrap_dataset_for_transforms_v2`) and a CSV of boxes. The annotations are audited when the data set
is built (`data.boxes`): fixed, dropped or refused before any training step.

A sample is (image, target): a uint8 `tv_tensors.Image` (C, H, W) and {boxes: BoundingBoxes (K, 4)
XYXY, labels: int64 (K,) in 1..C (0 is the background), image_id}. An image without annotations
has boxes of shape (0, 4), not a missing key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from torchkiln.data.detection.audit import AuditReport, audit, policy_for, read_annotations
from torchkiln.errors import DataError
from torchkiln.registry import DATASETS

log = logging.getLogger("torchkiln")


def _boxes_setting(boxes: Any) -> tuple[str, float]:
    """`data.boxes` as the config gives it (an object or a dict) -> (on_invalid, min_size)."""
    if boxes is None:
        return "fix", 1.0
    get = boxes.get if isinstance(boxes, dict) else lambda k, d: getattr(boxes, k, d)
    return str(get("on_invalid", "fix")), float(get("min_size", 1.0))


def _coco_index(data: dict[str, Any]):
    """A COCO index of an annotation dict in memory (pycocotools, as CocoDetection reads it)."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        from torchkiln.errors import ConfigError

        raise ConfigError("COCO detection data need pycocotools: pip install 'torchkiln[detection]'") from None
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    return coco


def _coco_detection(root: Path, data: dict[str, Any]):
    """A torchvision CocoDetection over annotations already in memory (the audited copy)."""
    from torchvision.datasets import CocoDetection

    class AuditedCoco(CocoDetection):
        def __init__(self) -> None:  # CocoDetection's own reads the file; this takes the audited dict
            super(CocoDetection, self).__init__(str(root))
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                self.coco = _coco_index(data)
            self.ids = sorted(self.coco.imgs.keys())

    return AuditedCoco()


class DetectionDataset(Dataset):
    """Audited COCO-format annotations over an image folder; see the module docstring."""

    decodes_images = True  # uint8 images: the pipeline ends with float32 in [0, 1]
    joint_transforms = True  # transforms see (image, target): boxes move with the image
    detection = True

    def __init__(self, data: dict[str, Any], images: str | Path, source: str, boxes: Any = None):
        on_invalid, min_size = _boxes_setting(boxes)
        report, fixed = audit(data, images, policy_for(on_invalid, min_size), where=f"{source}: images")
        self.audit_report: AuditReport = report
        self.source = source
        if on_invalid == "error" and report.faults:
            raise DataError(f"{source}: {report.faults} annotation fault(s) ({_counts(report)}); run"
                            f" `kiln data check {source} --images {images}` for examples, or set"
                            " data.boxes.on_invalid: fix")
        if report.faults:
            log.info("data: %s: %d annotation fault(s): %s; on_invalid %s: %d boxes fixed, %d dropped",
                     source, report.faults, _counts(report), on_invalid, report.fixed, report.dropped)
        cats = sorted(fixed["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.classes = [str(c.get("name", c["id"])) for c in cats]
        self.num_classes = len(self.classes)
        self._label = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        from torchvision.datasets import wrap_dataset_for_transforms_v2

        self.coco = _coco_detection(Path(images), fixed)
        self.inner = wrap_dataset_for_transforms_v2(self.coco, target_keys=("image_id", "boxes", "labels"))
        self.ids = list(self.coco.ids)
        self.files = [self.coco.coco.imgs[i]["file_name"] for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        image, target = self.inner[index]
        image = tv_tensors.Image(F.pil_to_tensor(image.convert("RGB")))
        size = tuple(image.shape[-2:])
        boxes = target.get("boxes")
        if boxes is None:
            boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=size)
            labels = torch.zeros(0, dtype=torch.int64)
        else:
            labels = torch.as_tensor([self._label[int(c)] for c in target["labels"]], dtype=torch.int64)
        return image, {"boxes": boxes, "labels": labels, "image_id": int(self.ids[index])}

    @property
    def targets(self) -> None:  # no class label per sample (stratified splits do not apply)
        return None

    def box_labels(self) -> list[torch.Tensor]:
        """Each image's box labels, without decoding images (statistics)."""
        anns = self.coco.coco.imgToAnns
        return [torch.as_tensor([self._label[a["category_id"]] for a in anns.get(i, [])], dtype=torch.int64)
                for i in self.ids]

    def box_sizes(self) -> list[tuple[float, float]]:
        """(width, height) of every box as stored."""
        return [(a["bbox"][2], a["bbox"][3]) for a in self.coco.coco.dataset["annotations"]]


def _counts(report: AuditReport) -> str:
    return ", ".join(f"{k} {v}" for k, v in report.counts.items() if v)


@DATASETS.register(name="COCODetection")
def coco_detection(annotations: str, images: str, boxes: Any = None) -> DetectionDataset:
    """COCO-format `annotations` (JSON) over the image folder `images`."""
    return DetectionDataset(read_annotations(annotations), images, str(annotations), boxes)


@DATASETS.register(name="CSVBoxes")
def csv_boxes(csv: str, images: str, boxes: Any = None) -> DetectionDataset:
    """A CSV with columns image, x1, y1, x2, y2, label (one row per box) over the folder `images`."""
    path = Path(csv)
    if path.suffix.lower() != ".csv":
        raise DataError(f"{csv}: CSVBoxes reads a .csv file of boxes (image, x1, y1, x2, y2, label)")
    return DetectionDataset(read_annotations(path), images, str(csv), boxes)


@DATASETS.register(name="ShapesDetection")
def shapes_detection(root: str = "data/shapes", images: int = 300, size: int = 128, seed: int = 0,
                     boxes: Any = None) -> DetectionDataset:
    """The generated demo (data/detection/shapes.py): written into `root` when it is not there yet; a
    `root` made with other settings (`kiln data shapes ROOT --images N`) is refused, not retrained on
    or overwritten."""
    from torchkiln.data.detection.shapes import made_with, make_shapes, settings

    ann = Path(root) / "annotations.json"
    if not ann.is_file():
        make_shapes(root, images=images, size=size, seed=seed)
    data = read_annotations(ann)
    wanted, made = settings(images, size, seed), made_with(data)
    if made != wanted:
        found = "has no record of its settings" if made is None else f"was made with {_words(made)}"
        raise DataError(f"{root}: this shapes demo folder {found}, but data.dataset.args asks for {_words(wanted)};"
                        f" set data.dataset.args to match, or remove {root} to have it made again")
    return DetectionDataset(data, Path(root) / "images", str(ann), boxes)


def _words(made: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in made.items())


for _factory in (coco_detection, csv_boxes, shapes_detection):
    _factory.decodes_images = True  # type: ignore[attr-defined]  # kiln predict decodes to uint8, then floats
