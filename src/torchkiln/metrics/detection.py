"""Detection metrics: mAP, mAP@50, mAP@75, mAR@100 and the AP of each class through torchmetrics'
MeanAveragePrecision (the faster-coco-eval backend when installed, else pycocotools), and the
detector's loss components, each exact over the epoch's images.

An image with no predictions is given an empty prediction ((0, 4) boxes): its objects count as
missed. A whole epoch without a single prediction (an untrained detector) gives 0, not the
crash of pycocotools' loadRes([]).

The numbers are separate scalar metrics (`map_50`, ...) so that each can be `trainer.monitor`;
they read one shared evaluation, computed once per epoch.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

SCORES = {"map": "map", "map_50": "map_50", "map_75": "map_75", "mar_100": "mar_100"}


def coco_backend() -> str:
    """faster_coco_eval when installed, else pycocotools; neither: a ConfigError naming the extra."""
    import importlib.util

    for name in ("faster_coco_eval", "pycocotools"):
        if importlib.util.find_spec(name) is not None:
            return name
    from torchkiln.errors import ConfigError

    raise ConfigError("detection metrics need faster-coco-eval or pycocotools: pip install 'torchkiln[detection]'")


class _Quiet(Metric):
    """Computes to nothing (no key at all) in an epoch without updates: the training split of a
    detection run, where the model gives losses, not boxes."""

    def _wrap_compute(self, compute):
        wrapped = super()._wrap_compute(compute)

        def quiet(*args: Any, **kwargs: Any) -> Any:
            return wrapped(*args, **kwargs) if self.update_called else {}

        return quiet


class MeanAP(_Quiet):
    """torchmetrics' MeanAveragePrecision, held by the collection's `map` entry; `value(key)` is
    one of its numbers (computed once, then cached until the next update or reset)."""

    full_state_update = False

    def __init__(self, num_classes: int | None = None, iou_type: str = "bbox", **kwargs: Any):
        super().__init__()
        from torchmetrics.detection import MeanAveragePrecision

        self.num_classes = num_classes
        self.inner = MeanAveragePrecision(iou_type=iou_type, class_metrics=True, backend=coco_backend(), **kwargs)
        self._result: dict[str, torch.Tensor] | None = None

    def update(self, preds: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> None:
        self._result = None
        self.inner.update(preds, targets)

    def reset(self) -> None:
        super().reset()
        self.inner.reset()
        self._result = None

    def result(self) -> dict[str, torch.Tensor]:
        if self._result is None:
            if not any(len(b) for b in self.inner.detection_box):  # no prediction at all: nothing found
                self._result = {k: torch.tensor(0.0) for k in SCORES.values()}
                truth = [t.reshape(-1) for t in self.inner.groundtruth_labels]
                self._result["classes"] = torch.cat(truth).unique() if truth else torch.zeros(0, dtype=torch.int64)
                self._result["map_per_class"] = torch.zeros(len(self._result["classes"]))
            else:
                self._result = self.inner.compute()
        return self._result

    def compute(self) -> torch.Tensor:
        return self.result()["map"]

    def per_class(self) -> torch.Tensor:
        """AP of classes 1..num_classes (index 0 is class 1); -1 for a class with no object."""
        r = self.result()
        out = torch.full((self.num_classes or 0,), -1.0)
        classes, values = r["classes"].reshape(-1), r["map_per_class"].reshape(-1)
        for c, v in zip(classes.tolist(), values.tolist()):
            if 1 <= c <= len(out):
                out[c - 1] = v
        return out


class MeanAPPart(_Quiet):
    """One number of a MeanAP (`map_50`, `mar_100`, or `ap_per_class`); it holds no state itself."""

    full_state_update = False

    def __init__(self, source: MeanAP, key: str):
        super().__init__()
        self.__dict__["source"] = source  # not a submodule: the source's state is saved once
        self.key = key

    def update(self, *_: Any) -> None:
        """Nothing to gather: the source holds the predictions."""

    def compute(self) -> torch.Tensor:
        if self.key == "ap_per_class":
            return self.source.per_class()
        return self.source.result()[self.key]


# the loss components of torchvision's detectors (Faster R-CNN; RetinaNet, FCOS and SSD)
LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg",
              "classification", "bbox_regression", "bbox_ctrness")


class LossParts(Metric):
    """Each loss component the detector gives (`loss/classifier`, `loss/box_reg`, ...), a mean over
    images; components it never gives are not logged."""

    full_state_update = False

    def __init__(self, names: tuple[str, ...] = LOSS_NAMES):
        super().__init__()
        self.names = tuple(names)
        self.add_state("sums", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, losses: dict[str, torch.Tensor], n: int) -> None:
        values = torch.zeros(len(self.names), dtype=torch.float64)
        seen = torch.zeros(len(self.names), dtype=torch.float64)
        for k, v in losses.items():
            if k in self.names:
                i = self.names.index(k)
                values[i], seen[i] = float(v.detach()) * n, n
        self.sums += values.to(self.sums.device)
        self.counts += seen.to(self.counts.device)

    def compute(self) -> dict[str, torch.Tensor]:
        return {f"loss/{loss_name(k)}": self.sums[i] / self.counts[i] for i, k in enumerate(self.names)
                if self.counts[i] > 0}


def loss_name(key: str) -> str:
    return key[5:] if key.startswith("loss_") else key


def detection_metrics(num_classes: int | None, loss_names: tuple[str, ...] = LOSS_NAMES) -> dict[str, Metric]:
    """The collection's entries: map, map_50, map_75, mar_100, ap_per_class and the loss parts."""
    source = MeanAP(num_classes)
    metrics: dict[str, Metric] = {"map": source}
    for key in ("map_50", "map_75", "mar_100", "ap_per_class"):
        metrics[key] = MeanAPPart(source, key)
    metrics["losses"] = LossParts(loss_names)
    return metrics
