"""GPU check for issue 23 (prepared; run from benchmarks/device_check.sh where CUDA is lent).

1. A model that places itself: `seq1` on cuda:0 and `seq2` on cuda:1 (or on the CPU when one GPU
   is visible), `forward` moving the tensor between them, trains through the Trainer, checkpoints,
   and the checkpoint loads back into a fresh split model with equal weights.
2. With 2+ GPUs: `kiln train --devices 2` with trainer.strategy fsdp, precision bf16 (NCCL), its
   DCP checkpoint resumed for one more epoch, and `kiln export` of the run; and the peak GPU
   memory of ddp and fsdp on a wide MLP, side by side.
Prints one line per check: `ok ...` or `FAIL ...`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]


class Split(nn.Module):
    def __init__(self, first: str, second: str):
        super().__init__()
        self.seq1 = nn.Sequential(nn.Linear(64, 256), nn.ReLU()).to(first)
        self.seq2 = nn.Linear(256, 10).to(second)

    def forward(self, x):
        return self.seq2(self.seq1(x).to(self.seq2.weight.device))


def self_placed(out: Path) -> str:
    from torchkiln import make_trainer
    from torchkiln.engine.checkpoint import load_checkpoint

    second = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    torch.manual_seed(0)
    model = Split("cuda:0", second)
    data = TensorDataset(torch.randn(512, 64), torch.randint(0, 10, (512,)))
    loader = DataLoader(data, batch_size=64)
    trainer = make_trainer(model, torch.optim.AdamW(model.parameters(), 1e-3), nn.CrossEntropyLoss(),
                           device="model", epochs=2, run_dir=out / "split", progress=False,
                           monitor="val/loss", grad_clip=1.0)
    trainer.fit(loader, loader)
    assert model.seq1[0].weight.device.type == "cuda" and str(model.seq2.weight.device) == second
    state = load_checkpoint(out / "split" / "checkpoints" / "last.ckpt")
    fresh = Split("cuda:0", second)
    fresh.load_state_dict(state["model"])
    same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert same, "reloaded weights differ"
    return f"self-placed model cuda:0 + {second}: trained {trainer.loop.global_step} steps, checkpoint reloads equal"


def kiln(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "torchkiln", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=400)
    if proc.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)}: {proc.stderr.strip().splitlines()[-1:]}")
    return proc


def fsdp_cli(out: Path) -> str:
    common = [f"output_dir={out}/runs", "name=fsdp", "trainer.device=cuda", "trainer.strategy=fsdp",
              "trainer.precision=bf16", "trainer.fsdp.wrap=[Linear]", "trainer.grad_clip=1.0"]
    kiln("train", "-q", "--devices", "2", "trainer.epochs=2", *common, cwd=out)
    run = next((out / "runs" / "fsdp").iterdir())
    kiln("train", "-q", "--resume", str(run), "--devices", "2", "trainer.epochs=3", cwd=out)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["loop"]["epoch"] == 3 and state["sharded"]["dir"].startswith("last."), state["loop"]["epoch"]
    kiln("export", str(run), cwd=out)
    summary = json.loads((run / "summary.json").read_text())
    return f"fsdp bf16 on 2 GPUs: 2 epochs, resumed to 3, exported; best {summary['monitor']} {summary['best']:.4f}"


MEMORY_WORKER = r'''
import os, sys, torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, os.environ["KILN_SRC"])
from torchkiln.engine.fsdp import FSDPSettings, shard_model
dist.init_process_group("nccl"); r = dist.get_rank(); torch.cuda.set_device(r)
strategy = sys.argv[1]
torch.manual_seed(0)
model = nn.Sequential(*[nn.Sequential(nn.Linear(4096, 4096), nn.ReLU()) for _ in range(16)]).cuda()
opt = torch.optim.AdamW(model.parameters(), 1e-4)
if strategy == "ddp":
    run = nn.parallel.DistributedDataParallel(model, device_ids=[r])
else:
    run = shard_model(model, opt, FSDPSettings(wrap=["Sequential"]))
torch.cuda.reset_peak_memory_stats()
for _ in range(3):
    run(torch.randn(64, 4096, device="cuda")).square().mean().backward(); opt.step(); opt.zero_grad()
peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
dist.all_reduce(peak, op=dist.ReduceOp.MAX)
if r == 0: print(f"{strategy} peak GiB {peak.item():.2f}")
dist.destroy_process_group()
'''


def memory(out: Path) -> str:
    script = out / "memory_worker.py"
    script.write_text(MEMORY_WORKER)
    lines = []
    for strategy in ("ddp", "fsdp"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                               strategy], env={**os.environ, "KILN_SRC": str(ROOT / "src")}, capture_output=True,
                              text=True, timeout=300)
        lines.append(proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else
                     f"{strategy} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return "memory, 268M-parameter MLP, AdamW, 2 GPUs: " + "; ".join(lines)


def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL no CUDA")
        return 1
    checks = [self_placed] + ([fsdp_cli, memory] if torch.cuda.device_count() > 1 else [])
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for check in checks:
            try:
                print("ok", check(Path(tmp)), flush=True)
            except Exception as exc:  # noqa: BLE001 - report every check
                failed += 1
                print("FAIL", check.__name__, f"{type(exc).__name__}: {exc}", flush=True)
    if torch.cuda.device_count() < 2:
        print("note: one GPU visible: the FSDP and two-GPU checks need 2 (the split used cuda:0 + cpu)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
