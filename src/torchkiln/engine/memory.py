"""What a training step holds in memory, measured, and what to do when it does not fit.

- `SavedActivations`: the bytes autograd saves for backward during a forward (the activations),
  counted with saved-tensor hooks, so it works on every device.
- `StepMemory`: parameters + gradients + optimizer state + one batch of activations, and from it
  the batch size that fits a device's memory.
- `oom_options`: the concrete options, with numbers, that the OOM messages and report give.
- `checkpoint_modules`: `trainer.activation_checkpointing`, named submodules run under
  torch.utils.checkpoint (their activations are recomputed in backward instead of kept).
- `current_bytes`: the number the leak watch samples (the CUDA allocator, or the process's RSS).
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from torchkiln.errors import SettingError

MB = 2**20
MARGIN = 0.10  # the share of device memory left free when a batch size is chosen from an estimate


def mb(n: float | None) -> str:
    if n is None:
        return "?"
    if abs(n) < MB:
        return f"{n / 1024:.1f} KB"
    return f"{n / MB:.1f} MB" if abs(n) < 2**30 else f"{n / 2**30:.2f} GB"


def free_memory() -> None:
    """After a failed step, once its traceback is gone (which frees its tensors, by reference count):
    give the allocator's cached blocks back to the device. No gc.collect(): it costs about a second
    in a process with torch, timm and torchvision loaded, and the step's tensors hold no cycles."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(state.values()) for state in optimizer.state.values())


class SavedActivations:
    """A context that counts the bytes of the tensors autograd saves for backward (parameters not
    included, each storage once): the activations a batch keeps until its backward."""

    def __init__(self, model: nn.Module):
        self._params = {p.data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (some subclasses)
            ptr, size = id(t), t.numel() * t.element_size()
        if ptr not in self._params and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += size
        return t.detach()  # not `t`: a saved output would hold itself through its grad_fn (a cycle gc cannot see)

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


@dataclass
class StepMemory:
    """A training step's memory: the fixed part (weights, gradients, optimizer state) and the
    activations of a batch of `batch` samples, for the precision it was measured in."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    batch: int
    precision: str

    @classmethod
    def of(cls, model: nn.Module, optimizer: torch.optim.Optimizer, activations: int, batch: int,
           precision: str) -> StepMemory:
        params = list(model.parameters())
        return cls(tensor_bytes(params), tensor_bytes(p for p in params if p.requires_grad),
                   optimizer_state_bytes(optimizer), activations, batch, precision)

    @property
    def fixed(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state

    @property
    def per_sample(self) -> float:
        return self.activations / max(1, self.batch)

    @property
    def total(self) -> int:
        return self.fixed + self.activations

    def batch_that_fits(self, capacity: int, margin: float = MARGIN) -> int | None:
        """The largest batch whose estimate stays under `capacity` less the margin (None: unknown)."""
        if self.per_sample <= 0:
            return None
        return max(0, math.floor((capacity * (1 - margin) - self.fixed) / self.per_sample))

    def line(self) -> str:
        return (f"memory estimate ({self.precision}): parameters {mb(self.parameters)} + gradients"
                f" {mb(self.gradients)} + optimizer state {mb(self.optimizer_state)} + activations"
                f" {mb(self.activations)} for a batch of {self.batch} ({mb(self.per_sample)} per sample)"
                f" = {mb(self.total)}")


def device_capacity(device: torch.device) -> int | None:
    """The bytes a device holds (CUDA); None where running out is not the device's to report."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


def current_bytes(device: torch.device) -> int:
    """Allocated memory now: the CUDA allocator's count on a GPU, the process's RSS elsewhere."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def oom_options(batch: int, accumulate: int, precision: str, *, estimate: StepMemory | None = None,
                capacity: int | None = None, channels_last: bool = False, checkpointed: bool = False,
                allocated: int | None = None, reserved: int | None = None) -> list[str]:
    """What to try when a batch of `batch` samples ran out of memory, each with its numbers."""
    fits = estimate.batch_that_fits(capacity) if estimate is not None and capacity else None
    smaller = min(fits, batch - 1) if fits else max(1, batch // 2)
    acc = math.ceil(batch * accumulate / max(1, smaller))
    how = "from the memory estimate" if fits else "half of it"
    options = [f"data.batch_size={smaller} trainer.accumulate={acc} (a batch that fits, {how}; the effective"
               f" batch stays {batch * accumulate}, or more)"]
    if precision == "32":
        options.append("trainer.precision=bf16 (activations in half the bytes; fp16 where the GPU lacks bf16)")
    if not channels_last:
        options.append("trainer.channels_last=true (convolutional models: less memory for cuDNN's workspaces)")
    if not checkpointed:
        options.append("trainer.activation_checkpointing=[NAMES] (the model's blocks recompute their activations"
                       " in backward instead of keeping them)")
    if allocated is not None and reserved is not None and reserved > 1.5 * allocated + 256 * MB:
        options.append(f"reserved {mb(reserved)} is far above allocated {mb(allocated)}: the cache is fragmented;"
                       " set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, or call torch.cuda.empty_cache()"
                       " where the batch shape changes")
    options.append("trainer.on_oom=split (retry a step as micro-batches instead of stopping)")
    return options


# ------------------------------------------------------------------------------------------
# activation checkpointing
# ------------------------------------------------------------------------------------------
_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """`cls` whose training forward runs under torch.utils.checkpoint (made once per class; a
    subclass, so state_dict keys, deepcopy and DDP see the same module)."""
    if cls in _CHECKPOINTED:
        return _CHECKPOINTED[cls]

    def forward(self, *args, **kwargs):
        inner = super(new, self).forward
        if self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    new = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "_kiln_checkpointed": True})
    _CHECKPOINTED[cls] = new
    return new


def checkpoint_modules(model: nn.Module, names: list[str] | None) -> list[str]:
    """Run each named submodule (`layer1`, `blocks.3`) under activation checkpointing; returns the names."""
    if not names:
        return []
    known = [n for n, _ in model.named_modules() if n]
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; close: {', '.join(close)}" if close else f"; the model's top modules: {', '.join(known[:8])}"
            raise SettingError("activation_checkpointing", f"the model has no submodule {name!r}{hint}") from None
        if not getattr(module, "_kiln_checkpointed", False):
            module.__class__ = _checkpointed_class(type(module))
    return list(names)


def is_checkpointed(model: nn.Module) -> bool:
    return any(getattr(m, "_kiln_checkpointed", False) for m in model.modules())
