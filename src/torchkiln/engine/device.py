"""Where the run's tensors live: the device asked for, and batches moved there."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchkiln.errors import SettingError


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) in ("auto", "model"):  # model: a guess until the model is seen
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SettingError("device", f"{device!r} is not a device; use auto, cpu, cuda, cuda:N (the N-th GPU),"
                           " mps, or model (a model that places itself)") from exc
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


# ------------------------------------------------------------------------------------------
# models that place themselves (model parallelism: submodules on several devices)
# ------------------------------------------------------------------------------------------
SELF_PLACED = "model"  # trainer.device: model -- the Trainer moves neither the model nor its parameters


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """The devices the model's parameters (then buffers) sit on, in the order they first appear."""
    seen: list[torch.device] = []
    for t in [*model.parameters(), *model.buffers()]:
        if t.device not in seen:
            seen.append(t.device)
    return seen


def places_itself(model: torch.nn.Module, requested: str | torch.device | None) -> bool:
    """`trainer.device: model`, or parameters already on several devices: the model is left where it is."""
    return str(requested) == SELF_PLACED or len(model_devices(model)) > 1


def self_placed_devices(model: torch.nn.Module) -> tuple[torch.device, torch.device]:
    """(inputs' device, loss's device) of a model that places itself.

    Inputs go to the model's declared `input_device`, else to its first parameter's device. The
    loss, targets and metrics go where the output comes out: the declared `output_device`, else
    the device of the model's last parameter (the end of a pipeline of submodules).
    """
    params = list(model.parameters())
    if not params and not (hasattr(model, "input_device") and hasattr(model, "output_device")):
        raise SettingError("device", "model: this model has no parameters to place its inputs by; declare"
                           " input_device and output_device on it, or use a device name")
    declared_in = getattr(model, "input_device", None)
    declared_out = getattr(model, "output_device", None)
    first = torch.device(declared_in) if declared_in is not None else params[0].device
    last = torch.device(declared_out) if declared_out is not None else params[-1].device
    return first, last


class SelfPlaced(torch.nn.Module):
    """A model that places itself, as the loop calls it: its inputs are moved to its input device."""

    def __init__(self, module: torch.nn.Module, input_device: torch.device):
        super().__init__()
        self.module = module
        self.input_device = input_device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*move_to(args, self.input_device), **move_to(kwargs, self.input_device))


def to_cpu(x: Any, float32: bool = True) -> Any:
    """Outputs or targets (a tensor, or dicts, lists and tuples of them) detached on the CPU; a
    floating tensor as float32 unless `float32=False` (checkpoint state: every dtype kept)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return x.float().cpu() if float32 and x.is_floating_point() else x.cpu()
    if isinstance(x, Mapping):
        return {k: to_cpu(v, float32) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_cpu(v, float32) for v in x)
    return x


def cat_outputs(parts: list[Any]) -> Any:
    """Batches' outputs or targets concatenated along the batch: tensors; dicts of the same keys
    (one per head); lists of per-input records (detections' dicts), joined; tuples or lists of
    tensors, by position; a scalar per batch (a loss), stacked. None: an empty tensor."""
    if not parts:
        return torch.empty(0)
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if first.dim() else torch.stack(parts)
    if isinstance(first, Mapping):
        return {k: cat_outputs([p[k] for p in parts]) for k in first}
    if isinstance(first, list) and (not first or isinstance(first[0], Mapping)):
        return [item for part in parts for item in part]
    return type(first)(cat_outputs([p[i] for p in parts]) for i in range(len(first)))
