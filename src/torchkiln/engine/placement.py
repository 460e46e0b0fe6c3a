"""Where and how the model runs: device, memory format, torch.compile and the distributed wrapper.

The Trainer holds the user's model (`raw_model`: its weights are what checkpoints hold); this
holds what runs: `train_model` what the training loop calls (compiled, wrapped by DDP, FSDP or
DataParallel), `eval_model` what evaluation calls (no DDP: ranks see uneven shards, so no
collective may run; under FSDP the parameters are gathered once when evaluation starts).

A model that places itself (`device: model`, or parameters on several devices) is not moved: its
inputs go to its input device, the loss and metrics to its output device (engine/device.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from torchkiln.engine import distributed
from torchkiln.engine.device import (
    SelfPlaced,
    move_to,
    places_itself,
    resolve_device,
    self_placed_devices,
)
from torchkiln.errors import SettingError

log = logging.getLogger("torchkiln")


class Placement:
    def __init__(self, device: str | torch.device | None = None, *, channels_last: bool = False,
                 compile: bool = False, compile_options: dict[str, Any] | None = None,
                 cache_size_limit: int | None = None, strategy: str = "auto", sync_batchnorm: bool = False,
                 fsdp: Any = None):
        self.requested = device
        self.device = resolve_device(device)  # for a model that places itself: its output device, in adopt
        self.input_device: torch.device | None = None  # set for a model that places itself
        self.channels_last = channels_last
        self.compile = compile
        self.compile_options = dict(compile_options or {})
        self.cache_size_limit = cache_size_limit
        self.strategy = strategy
        self.sync_batchnorm = sync_batchnorm
        self.fsdp = fsdp  # engine/fsdp.py:FSDPSettings under strategy fsdp
        self.train_model: nn.Module | None = None
        self.eval_model: nn.Module | None = None  # also what DDP wraps (compiled, synced BN)
        self._dynamo_before: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        return self.train_model is not None

    @property
    def self_placed(self) -> bool:
        return self.input_device is not None

    def adopt(self, model: nn.Module) -> Placement:
        """Look at the model once: one that places itself keeps its devices (the loss follows its output)."""
        if places_itself(model, self.requested):
            self.input_device, self.device = self_placed_devices(model)
            log.info("the model places itself: inputs to %s, loss and metrics on %s", self.input_device,
                     self.device)
        return self

    def setup(self, model: nn.Module, modules: Iterable[nn.Module | None],
              optimizer: torch.optim.Optimizer | None) -> None:
        """Move the model (and the loss, metrics, optimizer state) to the device; compile and wrap."""
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        if self.self_placed:
            if self.strategy not in ("auto",) or distributed.is_distributed():
                raise SettingError("device", "model: a model that places itself trains in one process"
                                   " (strategy auto, no --devices)")
        else:
            model.to(self.device, memory_format=memory_format)
        for m in modules:
            if m is not None:
                m.to(self.device)
        move_optimizer_state(optimizer)
        if self.strategy == "fsdp" and distributed.is_distributed():  # shard first, then compile the root
            self.train_model = distributed.wrap_model(model, self.device, self.strategy, self.sync_batchnorm,
                                                      optimizer=optimizer, fsdp=self.fsdp)
            if self.compile:
                self.train_model.module = self._compiled(self.train_model.module)
            self.eval_model = self.train_model
            return
        wrapped = self._compiled(model) if self.compile else model
        if self.self_placed:
            wrapped = SelfPlaced(wrapped, self.input_device)
        self.train_model = distributed.wrap_model(wrapped, self.device, self.strategy, self.sync_batchnorm)
        self.eval_model = distributed.unwrap_ddp(self.train_model)

    def _compiled(self, model: nn.Module) -> nn.Module:
        from torchkiln.engine.compile import compile_model, dynamo_stats

        self._dynamo_before = dynamo_stats()
        return compile_model(model, self.compile_options, self.cache_size_limit)

    def trainable_changed(self) -> None:
        """Frozen or unfrozen parameters: DDP all-reduces the gradients of exactly the parameters
        that required them when it was built, so it is built again over the new trainable set
        (the ranks hold equal weights; every rank does this at the same epoch)."""
        if isinstance(self.train_model, nn.parallel.DistributedDataParallel):
            self.train_model = distributed.wrap_model(self.eval_model, self.device, self.strategy, False)

    def to_device(self, batch: Any) -> Any:
        return move_to(batch, self.device, self.channels_last)

    def compile_report(self) -> dict[str, Any] | None:
        if self._dynamo_before is None:
            return None
        from torchkiln.engine.compile import report_compilation

        return report_compilation(self._dynamo_before)


def move_optimizer_state(optimizer: torch.optim.Optimizer | None, device: torch.device | None = None) -> None:
    """Each parameter's optimizer state onto that parameter's device (a model that places itself
    spans several); `device` is only for state not keyed by a tensor."""
    for param, state in optimizer.state.items() if optimizer is not None else ():
        target = param.device if isinstance(param, torch.Tensor) else device
        if target is None:
            continue
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(target)
