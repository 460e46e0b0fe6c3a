"""Transform pipelines from config: torchvision.transforms.v2 names and arguments, one per split.

```yaml
data:
  transforms:
    train: [{type: RandomResizedCrop, args: {size: 32}}, {type: RandomHorizontalFlip}]
    eval:  [{type: Resize, args: {size: 36}}, {type: CenterCrop, args: {size: 32}}]
```
A step may also be an import path (`pkg.mod:MyTransform`). Arguments named `dtype` take torch
dtype names (`float32`), `interpolation` takes InterpolationMode names (`bilinear`), and a list
of `{type, args}` mappings (RandomApply, RandomChoice, Compose) is built recursively.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from torchkiln.errors import ConfigError, did_you_mean
from torchkiln.registry import check_args, construct, import_path


def _is_transform(obj: Any) -> bool:
    from torchvision.transforms import v2

    return inspect.isclass(obj) and issubclass(obj, v2.Transform) and obj is not v2.Transform


# v2 steps that cannot be a per-sample step of a classification/regression pipeline, and why.
NOT_PER_SAMPLE = {
    **{n: "it mixes whole batches (inputs and labels), so it is not a per-sample step" for n in ("CutMix", "MixUp")},
    **{n: "it returns a tuple of crops, which cannot be batched as one input; use RandomCrop or CenterCrop"
       for n in ("FiveCrop", "TenCrop")},
    "ToPILImage": "it gives PIL images, which cannot be batched; images reach the transforms as tensors already",
    **{n: "it needs bounding boxes or keypoints (detection data)"
       for n in ("RandomIoUCrop", "SanitizeBoundingBoxes", "SanitizeKeyPoints")},
    "UniformTemporalSubsample": "it is for videos (T, C, H, W)",
}


BOX_STEPS = {"RandomIoUCrop", "SanitizeBoundingBoxes"}  # steps that only detection pipelines take


def transform_names() -> list[str]:
    from torchvision.transforms import v2

    return sorted(n for n in dir(v2) if not n.startswith("_") and _is_transform(getattr(v2, n))
                  and n not in NOT_PER_SAMPLE)


def resolve_transform(name: str, where: str, boxes: bool = False) -> Callable:
    """`boxes`: a detection pipeline, which also takes the box-only steps."""
    if ":" in name:
        return import_path(name, where)
    from torchvision.transforms import v2

    if name in NOT_PER_SAMPLE and not (boxes and name in BOX_STEPS):
        raise ConfigError(f"{where}: transform '{name}' cannot be a data.transforms step: {NOT_PER_SAMPLE[name]}")
    obj = getattr(v2, name, None)
    if obj is None or not (_is_transform(obj) or name == "Compose"):
        raise ConfigError(f"{where}: unknown transform '{name}'{did_you_mean(name, transform_names())}"
                          f" (torchvision.transforms.v2 names, or an import path 'package.module:Name')")
    return obj


def _spec(step: Any) -> tuple[str, dict]:
    if isinstance(step, str):
        return step, {}
    if hasattr(step, "type"):
        return step.type, dict(step.args)
    if isinstance(step, dict) and "type" in step:
        return step["type"], dict(step.get("args", {}))
    raise ConfigError(f"transform step {step!r}: expected {{type, args}}")


def _convert(key: str, value: Any, where: str) -> Any:
    if key == "dtype" and isinstance(value, str):
        dt = getattr(torch, value, None)
        if not isinstance(dt, torch.dtype):
            raise ConfigError(f"{where}.{key}: '{value}' is not a torch dtype (e.g. float32)")
        return dt
    if key == "interpolation" and isinstance(value, str):
        from torchvision.transforms import InterpolationMode

        try:
            return InterpolationMode[value.upper()]
        except KeyError:
            names = [m.name.lower() for m in InterpolationMode]
            raise ConfigError(f"{where}.{key}: '{value}'{did_you_mean(value, names)} (one of {names})") from None
    if isinstance(value, list) and value and all(isinstance(v, dict) and "type" in v for v in value):
        return [build_transform(v, f"{where}.{key}.{i}") for i, v in enumerate(value)]
    return value


def _lists_to_tensors(factory: Callable, kwargs: dict[str, Any]) -> None:
    """Numbers in nested lists become tensors where the parameter takes only a tensor
    (LinearTransformation's matrix and mean), and import paths become the functions they name
    (Lambda's `lambd`)."""
    from torchkiln.argtypes import hints_of

    hints = hints_of(factory)
    for key, value in kwargs.items():
        if isinstance(value, list) and getattr(hints.get(key), "__name__", "") == "Tensor":
            kwargs[key] = torch.tensor(value, dtype=torch.float32)
        elif key == "lambd" and isinstance(value, str):
            kwargs[key] = import_path(value, f"data.transforms: {factory.__name__}.lambd")


def build_transform(step: Any, where: str, boxes: bool = False) -> Callable:
    name, args = _spec(step)
    factory = resolve_transform(name, f"{where}.type", boxes)
    check_args(factory, args, f"{where}.args")
    kwargs = {k: _convert(k, v, f"{where}.args") for k, v in args.items()}
    _lists_to_tensors(factory, kwargs)
    return construct(factory, kwargs, where, name)


# Steps that take float images only: on decoded (uint8) images, the conversion to float32 in [0, 1]
# comes just before the first of them instead of after the last step.
FLOAT_ONLY = {"Normalize", "GaussianNoise", "LinearTransformation"}


def build_pipeline(steps: list[Any], where: str, to_float: bool = False, boxes: bool = False) -> Callable | None:
    """A v2.Compose of the steps (plus ToDtype(float32, scale=True) for decoded images), or None;
    `boxes`: a detection pipeline (box-only steps allowed)."""
    if not steps and not to_float:  # nothing to do: no torchvision import (~1.4 s with what it imports)
        return None
    from torchvision.transforms import v2

    built = [build_transform(s, f"{where}.{i}", boxes) for i, s in enumerate(steps)]
    if to_float:  # decoded images are uint8 until here: floats from the first step that needs them
        at = next((i for i, s in enumerate(steps) if _spec(s)[0] in FLOAT_ONLY), len(built))
        built.insert(at, v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(built) if built else None


def check_transforms(cfg_transforms: Any, boxes: bool = False) -> None:
    """Names and arguments resolve (and build) before any data is read."""
    for split in ("train", "eval"):
        if getattr(cfg_transforms, split):
            build_pipeline(getattr(cfg_transforms, split), f"data.transforms.{split}", boxes=boxes)


class Transformed(Dataset):
    """Apply `transform` to each sample's input (the first element, or `input` of a dict)."""

    def __init__(self, dataset: Dataset, transform: Callable | None):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        if isinstance(sample, dict):
            return {**sample, "input": self._apply(sample["input"])}
        if isinstance(sample, (tuple, list)):
            return (self._apply(sample[0]), *sample[1:])
        return self._apply(sample)

    def _apply(self, x: Any) -> Any:
        if self.transform is not None:
            x = self.transform(x)
        return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x
