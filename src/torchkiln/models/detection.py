"""torchvision detectors by name, built with `weights=None, weights_backbone=None` (nothing is ever
downloaded); `num_classes` comes from the data (its categories plus the background, class 0).

`weights` / `weights_backbone` may name local files (.safetensors, .pth, or a torchkiln
checkpoint): the whole detector's weights, or the backbone body's (torchvision's ImageNet
backbone files, e.g. mobilenet_v3_large-*.pth). Other arguments go to the torchvision builder
(min_size, max_size, box_detections_per_img, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from torchkiln.errors import ConfigError
from torchkiln.registry import MODELS

DETECTORS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
             "fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
             "ssdlite320_mobilenet_v3_large")


def _local_file(value: Any, key: str, name: str) -> Path | None:
    if value in (None, False):
        return None
    path = Path(str(value))
    if not path.is_file():
        raise ConfigError(f"model.args.{key}: {value}: no such file ({name} takes local weight files only;"
                          " nothing is downloaded)")
    return path


def build_detector(name: str, num_classes: int, weights: str | None = None,
                   weights_backbone: str | None = None, **kwargs: Any) -> nn.Module:
    """The torchvision detector `name` for `num_classes` object classes (the background is added)."""
    import torchvision.models.detection as tvd

    from torchkiln.models.pretrained import load_pretrained

    whole, backbone = _local_file(weights, "weights", name), _local_file(weights_backbone, "weights_backbone", name)
    model = getattr(tvd, name)(weights=None, weights_backbone=None, num_classes=int(num_classes) + 1, **kwargs)
    if backbone is not None:
        body = model.backbone.body if hasattr(model.backbone, "body") else model.backbone
        load_pretrained(body, backbone, strict=False)
    if whole is not None:
        load_pretrained(model, whole, strict=False)
    return model


def _register(name: str) -> None:
    def factory(num_classes: int, weights: str | None = None, weights_backbone: str | None = None,
                **kwargs: Any) -> nn.Module:
        return build_detector(name, num_classes, weights, weights_backbone, **kwargs)

    factory.__name__ = name
    factory.__doc__ = f"torchvision's {name} (weights from local files only); num_classes from the data."
    MODELS.register(name=name)(factory)


for _name in DETECTORS:
    _register(_name)
