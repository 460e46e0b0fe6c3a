"""Test-time augmentation: the model sees several views of each image batch, and the task's scores
(probabilities; values for regression) are averaged over the views.

`flip`: the batch and its horizontal mirror (2 views). `flip+crops`: the batch, the four corner
crops of the batch scaled up by 8/7 (each the input's size), and the mirror of each of those five
(10 views). The task turns the mean scores back into outputs (`Task.outputs_from_scores`: log
probabilities for classification), so `kiln test`'s loss and metrics and `kiln predict`'s columns
all read the averaged views.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchkiln.errors import ConfigError, DataError

TTA_CHOICES = ("none", "flip", "flip+crops")
CROP_SCALE = 8 / 7


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def corner_crops(x: torch.Tensor) -> list[torch.Tensor]:
    """The four corner crops (top-left, top-right, bottom-left, bottom-right) of `x` scaled up by 8/7."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    big = F.interpolate(x.float(), size=(round(h * CROP_SCALE), round(w * CROP_SCALE)), mode="bilinear",
                        align_corners=False, antialias=False).to(x.dtype)
    bh, bw = big.shape[-2:]
    return [big[..., top:top + h, left:left + w] for top in (0, bh - h) for left in (0, bw - w)]


def views_of(name: str) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    if name == "flip":
        return lambda x: [x, hflip(x)]
    if name == "flip+crops":
        return lambda x: [v for base in [x, *corner_crops(x)] for v in (base, hflip(base))]
    raise ConfigError(f"--tta: expected one of {', '.join(TTA_CHOICES)}; found {name!r}")


class TestTimeAugmentation:
    """Called by `Task.forward` in place of `model(inputs)` (see `Task.use_tta`)."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str):
        self.name = name
        self.views = views_of(name)

    def __call__(self, model: nn.Module, inputs: Any, task: Any) -> Any:
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise DataError(f"--tta {self.name}: needs image batches (N, C, H, W); the inputs are {shape}")
        views = self.views(inputs)
        total = None
        for view in views:
            scores = task.scores(model(view))
            total = scores if total is None else _add(total, scores)
        return task.outputs_from_scores(_scale(total, 1.0 / len(views)))


def make_tta(name: str | None) -> TestTimeAugmentation | None:
    return None if name in (None, "none") else TestTimeAugmentation(name)


def _add(a: Any, b: Any) -> Any:
    return {k: a[k] + b[k] for k in a} if isinstance(a, dict) else a + b


def _scale(a: Any, f: float) -> Any:
    return {k: v * f for k, v in a.items()} if isinstance(a, dict) else a * f
