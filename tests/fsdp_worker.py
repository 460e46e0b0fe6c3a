"""Run by tests/test_fsdp.py in two ranks forked from one forkserver (tests/ranks.py:two_ranks), or
by hand under `torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py parity OUT` (Gloo, CPU).

`parity OUT`: FSDP training through the Trainer (grad clipping, accumulation of 2, a block list,
evaluation on uneven shards) against a plain single-process loop on the concatenated batches, and
FSDP2's own reduction on Gloo with and without forced SUM (pytorch#162338). Rank 0 writes OUT (JSON).
"""

from __future__ import annotations

import json
import sys

import torch
from torch import distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

WORLD, PER_RANK, STEPS, ACCUMULATE, CLIP = 2, 4, 2, 2, 0.05


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.inp(x)))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK * ACCUMULATE * STEPS
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def reference(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain loop on the concatenated batch: global batch k = every rank's batch k."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    big = WORLD * PER_RANK
    for step in range(STEPS):
        for micro in range(ACCUMULATE):
            k = step * ACCUMULATE + micro
            rows = torch.cat([torch.arange(r * PER_RANK, (r + 1) * PER_RANK) + k * big for r in range(WORLD)])
            (nn.functional.cross_entropy(model(x[rows]), y[rows]) / ACCUMULATE).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def fsdp_trainer(x: torch.Tensor, y: torch.Tensor, precision: str = "32", **fsdp) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from torchkiln import make_trainer

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    r, big = dist.get_rank(), WORLD * PER_RANK
    mine = torch.cat([torch.arange(r * PER_RANK, (r + 1) * PER_RANK) + k * big
                      for k in range(STEPS * ACCUMULATE)])
    train = DataLoader(TensorDataset(x[mine], y[mine]), batch_size=PER_RANK)
    val_rows = 12 if r == 0 else 2  # uneven shards: evaluation may run no collective per batch
    val = DataLoader(TensorDataset(x[:val_rows], y[:val_rows]), batch_size=2)
    trainer = make_trainer(model, opt, nn.CrossEntropyLoss(), epochs=1, device="cpu", strategy="fsdp",
                           fsdp={"wrap": ["Block"], **fsdp}, grad_clip=CLIP, accumulate=ACCUMULATE,
                           precision=precision, progress=False)
    summary = trainer.fit(train, val)
    assert summary["global_step"] == STEPS, summary
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gloo_reduction(force_sum: bool) -> float:
    """One FSDP2 backward where every rank's loss is the same: the gradient's ratio to one rank's."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layer = nn.Linear(4, 4, bias=False)
    x = torch.ones(2, 4)
    expected = torch.autograd.grad(layer(x).sum(), layer.weight)[0]
    fully_shard(layer)
    layer.set_force_sum_reduction_for_comms(force_sum)
    layer(x).sum().backward()
    return float((layer.weight.grad.full_tensor() / expected).mean())


def loaded_state_is_sharded() -> float:
    """Optimizer state loaded before sharding (a checkpoint written without FSDP) is sharded like its
    parameter: the gathered moments equal the plain ones, and the next step runs."""
    from torchkiln.engine.fsdp import FSDPSettings, shard_model

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    before = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    shard_model(model, opt, FSDPSettings(wrap=["Block"]))
    diff = max(float((opt.state[p]["exp_avg"].full_tensor() - before[n]).abs().max())
               for n, p in model.named_parameters())
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    return diff


def parity(out: str) -> None:
    x, y = data()
    ref = reference(x, y)
    runs = {"blocks": fsdp_trainer(x, y), "checkpointed": fsdp_trainer(x, y, activation_checkpointing=True,
                                                                       reshard_after_forward=False)}
    bf16 = fsdp_trainer(x, y, precision="bf16")  # parameters gathered in bf16, gradients reduced in fp32
    ratios = {"forced_sum": gloo_reduction(True), "fsdp_default": gloo_reduction(False)}
    state_diff = loaded_state_is_sharded()
    if dist.get_rank() == 0:
        diffs = {name: max(float((sd[k] - ref[k]).abs().max()) for k in ref) for name, sd in runs.items()}
        torch.manual_seed(0)
        init = Net().state_dict()
        diffs_bf16 = max(float((bf16[k].float() - ref[k]).abs().max()) for k in ref)
        moved = max(float((ref[k] - init[k]).abs().max()) for k in ref)
        with open(out, "w") as f:
            json.dump({"max_abs_diff": diffs, "gradient_ratio": ratios, "reference_moved": moved,
                       "loaded_state_diff": state_diff, "bf16_max_abs_diff": diffs_bf16,
                       "bf16_dtype": str(bf16["head.weight"].dtype)}, f)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        {"parity": parity}[sys.argv[1]](*sys.argv[2:])
    finally:
        dist.destroy_process_group()
