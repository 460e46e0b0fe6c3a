"""Where and how the model runs: device, memory format, torch.compile and the distributed wrapper.

The Trainer holds the user's model (`raw_model`: its weights are what checkpoints hold); this
holds what runs: `train_model` what the training loop calls (compiled, wrapped by DDP or DataParallel),
`eval_model` what evaluation calls (no DDP: ranks see uneven shards, so no collective may run).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from torchkiln.engine import distributed
from torchkiln.engine.device import move_to, resolve_device


class Placement:
    def __init__(self, device: str | torch.device | None = None, *, channels_last: bool = False,
                 compile: bool = False, compile_options: dict[str, Any] | None = None,
                 cache_size_limit: int | None = None, strategy: str = "auto", sync_batchnorm: bool = False):
        self.device = resolve_device(device)
        self.channels_last = channels_last
        self.compile = compile
        self.compile_options = dict(compile_options or {})
        self.cache_size_limit = cache_size_limit
        self.strategy = strategy
        self.sync_batchnorm = sync_batchnorm
        self.train_model: nn.Module | None = None
        self.eval_model: nn.Module | None = None  # also what DDP wraps (compiled, synced BN)
        self._dynamo_before: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        return self.train_model is not None

    def setup(self, model: nn.Module, modules: Iterable[nn.Module | None],
              optimizer: torch.optim.Optimizer | None) -> None:
        """Move the model (and the loss, metrics, optimizer state) to the device; compile and wrap."""
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        model.to(self.device, memory_format=memory_format)
        for m in modules:
            if m is not None:
                m.to(self.device)
        move_optimizer_state(optimizer, self.device)
        wrapped = model
        if self.compile:
            from torchkiln.engine.compile import compile_model, dynamo_stats

            self._dynamo_before = dynamo_stats()
            wrapped = compile_model(model, self.compile_options, self.cache_size_limit)
        self.train_model = distributed.wrap_model(wrapped, self.device, self.strategy, self.sync_batchnorm)
        self.eval_model = distributed.unwrap_ddp(self.train_model)

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


def move_optimizer_state(optimizer: torch.optim.Optimizer | None, device: torch.device) -> None:
    for state in optimizer.state.values() if optimizer is not None else ():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)
