"""torchvision detectors by name, built with `weights=None, weights_backbone=None` (nothing is ever
downloaded); `num_classes` comes from the data (its categories plus the background, class 0).

`weights` / `weights_backbone` may name local files (.safetensors, .pth, or a torchkiln
checkpoint): the whole detector's weights, or the backbone body's (torchvision's ImageNet
backbone files, e.g. mobilenet_v3_large-*.pth). Other arguments go to the torchvision builder
(min_size, max_size, box_detections_per_img, ...).

`fasterrcnn_tiny` is torchvision's FasterRCNN on a small plain backbone (four conv stages, stride 8,
`width` channels) with one feature map, three anchor sizes and a narrow box head: about 0.5 M
parameters, so the shapes demo trains from scratch on a CPU in minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from torchkiln.errors import ConfigError
from torchkiln.registry import MODELS

DETECTORS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
             "fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
             "ssdlite320_mobilenet_v3_large", "fasterrcnn_tiny")


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
    builder = fasterrcnn_tiny if name == "fasterrcnn_tiny" else getattr(tvd, name)
    model = builder(weights=None, weights_backbone=None, num_classes=int(num_classes) + 1, **kwargs)
    if backbone is not None:
        body = model.backbone.body if hasattr(model.backbone, "body") else model.backbone
        load_pretrained(body, backbone, strict=False)
    if whole is not None:
        load_pretrained(model, whole, strict=False)
    return model


def fasterrcnn_tiny(num_classes: int, weights: None = None, weights_backbone: None = None, width: int = 32,
                    anchor_sizes: tuple[int, ...] = (16, 32, 64), representation: int = 128, **kwargs: Any
                    ) -> nn.Module:
    """FasterRCNN (torchvision) over a four-stage conv backbone of stride 8 and `width` channels."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = int(width)
    backbone = nn.Sequential(*stage(3, w // 2, 2), *stage(w // 2, w, 2), *stage(w, w, 1), *stage(w, w * 2, 2),
                             *stage(w * 2, w * 2, 1))
    backbone.out_channels = w * 2  # type: ignore[assignment]
    anchors = AnchorGenerator(sizes=(tuple(int(a) for a in anchor_sizes),), aspect_ratios=((0.5, 1.0, 2.0),))
    pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    head = TwoMLPHead(w * 2 * 7 * 7, int(representation))
    return FasterRCNN(backbone, rpn_anchor_generator=anchors, box_roi_pool=pool, box_head=head,
                      box_predictor=FastRCNNPredictor(int(representation), num_classes), **kwargs)


def _register(name: str) -> None:
    def factory(num_classes: int, weights: str | None = None, weights_backbone: str | None = None,
                **kwargs: Any) -> nn.Module:
        return build_detector(name, num_classes, weights, weights_backbone, **kwargs)

    factory.__name__ = name
    factory.__doc__ = f"torchvision's {name} (weights from local files only); num_classes from the data."
    MODELS.register(name=name)(factory)


for _name in DETECTORS:
    _register(_name)
