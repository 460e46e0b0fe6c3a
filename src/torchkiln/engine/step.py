"""ONE optimizer step: autocast, scale, accumulate, unscale, clip, step, skip-on-overflow.

Every precision and accumulation path in torchkiln goes through `OptimizerStep`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from torchkiln.engine.oom import OOMRecovery
from torchkiln.errors import SettingError, at_least

DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger("torchkiln")


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, before training, a precision this device cannot run."""
    if precision not in DTYPES:
        raise SettingError("precision", f"expected one of 32, bf16, fp16; found {precision!r}")
    if precision == "32":
        return
    if not torch.amp.is_autocast_available(device.type):
        raise SettingError("precision", f"{precision} autocast is not available on {device.type}; use 32")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise SettingError("precision", "this GPU has no bf16 support; use fp16 or 32")
    if device.type == "cpu":
        _warn_slow_cpu_precision(precision)
    if precision == "fp16":
        try:
            torch.amp.GradScaler(device.type)
        except Exception as exc:  # noqa: BLE001 - any failure means the device cannot do it
            raise SettingError(
                "precision", f"fp16 needs a GradScaler, which torch does not support on {device.type}"
                f" ({exc}); use bf16 or 32"
            ) from exc


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def _warn_slow_cpu_precision(precision: str) -> None:
    """Half precision on a CPU without matrix units for it is emulated: slower than 32. Measured on
    the default config (SmallCNN on digits, 2 epochs, 2-core AVX-512 CPU without AMX): fp16 21x,
    bf16 2.1x the time of 32."""
    unit = {"fp16": "amx_fp16", "bf16": "amx_bf16"}[precision]
    if unit in _cpu_flags():
        return
    log.warning("trainer.precision: %s on this CPU (no %s) is usually slower than 32 (fp16 many times);"
                " it pays off on GPUs (use trainer.precision=32 here)", precision, unit)


@dataclass
class StepResult:
    stepped: bool
    grad_norm: torch.Tensor | None


class OptimizerStep:
    """Owns the optimizer's step and the GradScaler; the trainer only calls its methods."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        device: torch.device | str | None = None,
        precision: str = "32",
        grad_clip: float | None = None,
        grad_clip_mode: str = "norm",
        accumulate: int = 1,
        scaler_options: dict | None = None,
        on_oom: str | OOMRecovery = "stop",
    ):
        if str(precision) not in DTYPES:
            raise SettingError("precision", f"expected one of 32, bf16, fp16; found {precision!r}")
        if grad_clip_mode not in ("norm", "value"):
            raise SettingError("grad_clip_mode", f"expected norm or value; found {grad_clip_mode!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise SettingError("grad_clip", f"expected a number > 0; found {grad_clip!r}")
        self.precision = str(precision)
        self.dtype = DTYPES[self.precision]
        self.grad_clip = grad_clip
        self.grad_clip_mode = grad_clip_mode
        self.accumulate = at_least("accumulate", accumulate, 1)  # batches per optimizer step
        self.scaler_options = dict(scaler_options or {})  # to torch.amp.GradScaler (init_scale, ...)
        self.optimizer: torch.optim.Optimizer | None = None
        self.device_type = "cpu"
        self.scaler: torch.amp.GradScaler | None = None
        self.skipped = 0
        self._scale: float | None = None  # the scale after the last update
        self.oom = on_oom if isinstance(on_oom, OOMRecovery) else OOMRecovery(on_oom)  # a batch's forward/backward
        if optimizer is not None:
            self.bind(optimizer, device if device is not None else "cpu")

    def bind(self, optimizer: torch.optim.Optimizer, device: torch.device | str) -> OptimizerStep:
        """Step `optimizer` on `device` (the Trainer binds its own; binding again changes nothing)."""
        device = torch.device(device)
        if self.optimizer is optimizer and self.device_type == device.type:
            return self
        check_precision(self.precision, device)
        self.optimizer, self.device_type = optimizer, device.type
        self.scaler = torch.amp.GradScaler(device.type, **self.scaler_options) if self.precision == "fp16" else None
        return self

    def params(self) -> Iterable[nn.Parameter]:
        for group in self.optimizer.param_groups:
            yield from (p for p in group["params"] if p.grad is not None)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def micro_context(self, model: nn.Module, last_in_group: bool) -> contextlib.AbstractContextManager:
        """DDP hook: skip the gradient all-reduce on all but the last micro-batch of a group."""
        if not last_in_group and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, weight: float = 1.0) -> None:
        """Backward of `loss * weight`; the weights of a group's micro-batches sum to 1 (their
        share of the group's samples), so the group's gradient is that of one big batch."""
        loss = loss * weight if weight != 1.0 else loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def clip(self, params: list[nn.Parameter], want_norm: bool) -> torch.Tensor | None:
        """Clip (already unscaled) gradients; return their total norm before clipping."""
        if self.grad_clip is not None and self.grad_clip_mode == "norm":
            return full_value(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if want_norm and params else None
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(params, self.grad_clip)
        return full_value(norm)

    def step(self, want_norm: bool = False) -> StepResult:
        """unscale -> clip -> step -> update -> zero_grad. `stepped` is False when the scaler skipped."""
        params = list(self.params())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = self.clip(params, want_norm)
        stepped = True
        if self.scaler is not None:
            before = self._scale if self._scale is not None else self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # The scale only ever goes down when the step was skipped for inf/NaN gradients.
            self._scale = self.scaler.get_scale()  # one device sync per step, not two
            stepped = self._scale >= before
        else:
            self.optimizer.step()
        if not stepped:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(stepped, norm)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
            self._scale = None
        self.skipped = int(state.get("skipped", 0))


def full_value(norm: torch.Tensor | None) -> torch.Tensor | None:
    """Under FSDP the gradients are DTensor shards and their norm a DTensor (clip_grad_norm_ reduces
    it over the ranks before clipping): the plain tensor of its value, for logging."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def is_finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


class AccumulationGroups:
    """Accumulation's arithmetic: which micro-batch ends a group, and each one's share of it."""

    def __init__(self, k: int, n_batches: int, sizes: list[int] | None):
        self.k, self.n, self.sizes = k, n_batches, sizes
        self.used = False  # a group whose every micro-batch was skipped takes no optimizer step

    def _bounds(self, i: int) -> tuple[int, int]:
        start = (i // self.k) * self.k
        return start, min(self.k, self.n - start)  # the epoch's last group may be shorter

    def last(self, i: int) -> bool:
        start, size = self._bounds(i)
        return i - start == size - 1

    def weight(self, i: int) -> float:
        """This micro-batch's share of its group's samples (so the group's gradient is one batch's)."""
        start, size = self._bounds(i)
        if self.sizes is None:
            return 1.0 / size
        return self.sizes[i] / sum(self.sizes[start:start + size])
