"""`timm:NAME` and `torchvision:NAME` model types. Weights never come from the network here.

Both build the architecture with random weights and a head sized for `num_classes`; pretrained
weights come from a local file through `model.pretrained` (see models/pretrained.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from torchkiln.errors import ConfigError, did_you_mean
from torchkiln.registry import MODELS

HUB_HINT = ("this toolkit does not download weights (no network is assumed); get the weights file"
            " once and set model.pretrained: /path/to/weights.safetensors (or .pth, or a torchkiln checkpoint)")


def hub_request(model_type: str, args: dict[str, Any]) -> str | None:
    """The argument that would make `model_type` download weights, or None."""
    if model_type.startswith("timm:"):
        if args.get("pretrained"):
            return "pretrained"
        if args.get("pretrained_cfg_overlay") or args.get("pretrained_cfg"):
            return "pretrained_cfg_overlay" if args.get("pretrained_cfg_overlay") else "pretrained_cfg"
    if model_type.startswith("torchvision:"):
        for key in ("weights", "weights_backbone"):
            if args.get(key) not in (None, False):
                return key
        if args.get("pretrained"):
            return "pretrained"
    return None


def _refuse_hub(model_type: str, args: dict[str, Any], where: str = "model.args") -> None:
    key = hub_request(model_type, args)
    if key is not None:
        raise ConfigError(f"{where}.{key}: {model_type} would download pretrained weights; {HUB_HINT}")


def _timm(name: str, where: str) -> Callable[..., nn.Module]:
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"{where}: unknown timm model '{name}'{did_you_mean(name, timm.list_models())}"
                          f" (list them with: python -c 'import timm; print(timm.list_models(\"resnet*\"))')")

    def build(num_classes: int | None = None, **kwargs: Any) -> nn.Module:
        _refuse_hub(f"timm:{name}", kwargs)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing below may reach a hub
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return timm.create_model(name, pretrained=False, **kwargs)

    build.__name__ = f"timm:{name}"
    return build


def _torchvision(name: str, where: str) -> Callable[..., nn.Module]:
    from torchvision import models

    names = models.list_models()
    if name not in names:
        raise ConfigError(f"{where}: unknown torchvision model '{name}'{did_you_mean(name, names)}")

    def build(num_classes: int | None = None, **kwargs: Any) -> nn.Module:
        _refuse_hub(f"torchvision:{name}", kwargs)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return models.get_model(name, weights=None, **kwargs)

    build.__name__ = f"torchvision:{name}"
    return build


def _timm_names() -> dict[str, Callable[..., nn.Module]]:
    import timm

    return {name: timm.models.model_entrypoint(name) for name in timm.list_models()}


def _torchvision_names() -> dict[str, Callable[..., nn.Module]]:
    from torchvision import models

    return {name: models.get_model_builder(name) for name in models.list_models()}


MODELS.register_scheme("timm", _timm, names=_timm_names)
MODELS.register_scheme("torchvision", _torchvision, names=_torchvision_names)
