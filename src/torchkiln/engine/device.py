"""Where the run's tensors live: the device asked for, and batches moved there."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchkiln.errors import SettingError


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", "CUDA was asked for but this machine has none; use auto or cpu")
    return device


def move_to(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        nb = device.type == "cuda"
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            return batch.to(device, non_blocking=nb, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=nb)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, channels_last) for v in batch)
    return batch
