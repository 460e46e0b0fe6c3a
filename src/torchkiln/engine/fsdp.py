"""`trainer.strategy: fsdp`: torch's FSDP2 (`fully_shard`) applied per block, then on the root.

Each rank holds 1/N of every parameter, gradient and optimizer state; a block's parameters are
all-gathered for its forward and backward and sharded again after (`reshard_after_forward`).
Nothing here shards by itself: it chooses where `fully_shard` goes, the mixed-precision policy
(from `trainer.precision`), CPU offload and activation checkpointing, and it keeps the
optimizer pointed at the sharded parameters (`fully_shard` replaces them).

Evaluation runs on ranks with uneven shards of the validation set, so it may not run a collective
per batch: `ShardedModel.eval()` all-gathers the parameters once on every rank (every rank
evaluates at the same moment) and `train()` shards them again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import distributed as dist
from torch import nn

from torchkiln.errors import SettingError

log = logging.getLogger("torchkiln")

PARAM_DTYPES = {"32": None, "bf16": torch.bfloat16}


@dataclass
class FSDPSettings:
    """`trainer.fsdp`: which module classes are sharded as blocks, and how."""

    wrap: list[str] = field(default_factory=list)
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    precision: str = "32"

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None, precision: str = "32") -> FSDPSettings:
        options = dict(options or {})
        unknown = set(options) - {"wrap", "reshard_after_forward", "cpu_offload", "activation_checkpointing"}
        if unknown:
            raise SettingError("fsdp", f"unknown key(s) {', '.join(sorted(unknown))}; expected wrap,"
                               " reshard_after_forward, cpu_offload, activation_checkpointing")
        return cls(precision=str(precision), **options)

    def check(self) -> None:
        if self.precision not in PARAM_DTYPES:
            raise SettingError("precision", f"{self.precision} is not supported with strategy fsdp (the fp16"
                               " GradScaler's inf check would differ between shards); use bf16 or 32")

    def mixed_precision(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype = PARAM_DTYPES[self.precision]
        # Parameters are gathered in bf16 for compute; gradients are reduced in float32.
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)


def blocks_of(model: nn.Module, wrap: list[str]) -> list[nn.Module]:
    """The submodules whose class name is listed in `wrap`, outermost first (a block inside a
    listed block is sharded with its parent). An unknown name is refused, naming the classes."""
    present = {type(m).__name__ for m in model.modules()}
    missing = [name for name in wrap if name not in present]
    if missing:
        raise SettingError("fsdp.wrap", f"no module of class {', '.join(missing)} in the model; its classes"
                           f" are {', '.join(sorted(present))}")
    found: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside or m is model:
            continue
        if type(m).__name__ in wrap:
            found.append(m)
            inside.update(id(sub) for sub in m.modules())
    return found


def shard_model(model: nn.Module, optimizer: torch.optim.Optimizer | None, settings: FSDPSettings) -> ShardedModel:
    """`fully_shard` each block, then the root; the optimizer is re-pointed at the sharded parameters."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    settings.check()
    names = {id(p): name for name, p in model.named_parameters()}
    blocks = blocks_of(model, settings.wrap)
    if settings.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in blocks or [model]:
            checkpoint(block)  # the block's activations are recomputed in backward
    options = {"mp_policy": settings.mixed_precision(),
               "offload_policy": CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy()}
    for block in blocks:
        fully_shard(block, reshard_after_forward=settings.reshard_after_forward, **options)
    fully_shard(model, **options)  # the root: parameters outside every block
    if dist.get_backend() == "gloo":
        # pytorch#162338: Gloo has no AVG reduce-scatter and FSDP2 would sum the ranks' gradients;
        # forcing SUM makes FSDP divide by the world size itself.
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_force_sum_reduction_for_comms(True)
    if optimizer is not None:
        repoint_optimizer(optimizer, names, dict(model.named_parameters()))
    log.info("FSDP: %d block(s) sharded (%s) and the root, over %d processes; precision %s%s%s",
             len(blocks), ", ".join(settings.wrap) or "none listed", dist.get_world_size(), settings.precision,
             ", CPU offload" if settings.cpu_offload else "",
             ", activation checkpointing" if settings.activation_checkpointing else "")
    return ShardedModel(model, settings.reshard_after_forward)


def repoint_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str],
                      sharded: dict[str, nn.Parameter]) -> None:
    """`fully_shard` registers new (DTensor) parameters: each param group's entries become the
    sharded parameter of the same name. State already loaded (a checkpoint written without FSDP,
    the same on every rank) is sharded like its parameter."""
    from torch.distributed.tensor import distribute_tensor

    moved: dict[nn.Parameter, nn.Parameter] = {}
    for group in optimizer.param_groups:
        try:
            new = [sharded[names[id(p)]] for p in group["params"]]
        except KeyError as exc:
            raise SettingError("strategy", "fsdp: the optimizer holds a tensor that is not a parameter of"
                               " the model") from exc
        moved.update(zip(group["params"], new))
        group["params"] = new
    for old in list(optimizer.state):
        new = moved.get(old)
        if new is None:
            continue
        optimizer.state[new] = {
            k: distribute_tensor(v.to(new.device), new.device_mesh, new.placements)
            if isinstance(v, torch.Tensor) and v.shape == new.shape else v
            for k, v in optimizer.state.pop(old).items()
        }


def fsdp_modules(model: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class ShardedModel(nn.Module):
    """The sharded model as the loop calls it: `train()` keeps it sharded, `eval()` gathers it
    once (a collective every rank makes together) so that evaluation runs without collectives."""

    def __init__(self, module: nn.Module, reshard_after_forward: bool = True):
        super().__init__()
        self.module = module  # the root, or the compiled root (placement compiles after sharding)
        self._root = id(module)
        self.reshard_after_forward = reshard_after_forward  # the blocks'; the root keeps its gather
        self.gathered = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> ShardedModel:
        if mode:
            self.shard()
        else:
            self.gather()
        return super().train(mode)

    def gather(self) -> None:
        if self.gathered:
            return
        for m in fsdp_modules(self.module):
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        self.gathered = True

    def shard(self) -> None:
        """Back to 1/N per rank (before training and before a checkpoint)."""
        if not self.gathered:
            return
        for m in fsdp_modules(self.module):
            m.reshard()
            m.set_reshard_after_forward(self.reshard_after_forward and id(m) != self._root, recurse=False)
        self.gathered = False


def unwrap_sharded(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, ShardedModel) else model

