"""GPU memory check (issue 20): the batch-size finder, recovery from a real CUDA out-of-memory, and the
memory snapshot, on ResNet-18 with synthetic 224x224 images. Prepared for `benchmarks/device_check.sh`;
exits 0 with "skipped: no CUDA" where there is no GPU.

    python benchmarks/memory_check.py --out /tmp/out/memory_check.md

1. The finder (binsearch, bf16, under a per-process memory cap so it ends quickly): each try's peak,
   the answer, then one real step at the answer (it must fit).
2. Recovery: a batch twice the largest that fits, `on_oom: split`: the steps recovered, the loss
   finite, and the gradient of a recovered step beside the same samples' unsplit gradient on a
   model copy run in pieces by hand.
3. `MemorySnapshot` for 3 steps: the file exists and is not empty.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "torchkiln").is_dir():
    sys.path.insert(0, str(_SRC))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from torchkiln.callbacks.memory import MemorySnapshot  # noqa: E402
from torchkiln.engine.batch_finder import find_batch_size  # noqa: E402
from torchkiln.engine.settings import make_trainer  # noqa: E402

CAP_GB = 8.0  # the memory the process may use (torch.cuda.set_per_process_memory_fraction)


def _model() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def _trainer(model: nn.Module, **kw):
    return make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), epochs=1, progress=False,
                        device="cuda", precision="bf16", train_metrics=False, **kw)


def _images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 224, 224, generator=g), torch.randint(0, 10, (n,), generator=g)


def check_finder(lines: list[str]) -> int:
    x, y = _images(64)
    trainer = _trainer(_model())
    started = time.perf_counter()
    result = find_batch_size(trainer, lambda n: (x[:1].expand(n, -1, -1, -1).contiguous(), y[:1].expand(n)),
                             samples=65536, mode="binsearch", start=16, max_size=8192)
    lines += [f"## Finder (ResNet-18, bf16, cap {CAP_GB:.0f} GB)", "", "```", *result.lines(), "```",
              f"{time.perf_counter() - started:.1f} s"]
    loader = DataLoader(TensorDataset(x[:1].expand(result.size, -1, -1, -1).contiguous(), y[:1].expand(result.size)),
                        batch_size=result.size)
    _trainer(_model()).fit(loader)
    lines.append(f"one step at the answer ({result.size}): fits")
    return result.largest


def check_recovery(largest: int, lines: list[str]) -> None:
    n = 2 * largest
    x, y = _images(min(n, 512))
    x, y = x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n], y.repeat((n + len(y) - 1) // len(y))[:n]
    model = _model()
    reference = copy.deepcopy(model)
    grads = []
    trainer = _trainer(model, on_oom="split")
    trainer.optimizer.register_step_pre_hook(
        lambda opt, *_: grads.append([p.grad.float().clone() for p in model.parameters()]) if not grads else None)
    model.train()
    summary = trainer.fit(DataLoader(TensorDataset(x, y), batch_size=n))
    lines += ["", f"## Recovery (batch {n} = 2 x the largest that fits, on_oom: split)", "",
              f"oom_recoveries {summary['oom_recoveries']}, steps {summary['global_step']},"
              f" train/loss {summary['final'].get('train/loss')}"]
    # The same samples' gradient, by hand in 4 pieces on the untouched copy (bf16 autocast as the run).
    reference.cuda().train()
    for xs, ys in zip(x.split(n // 4), y.split(n // 4)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(reference(xs.cuda()), ys.cuda()) * len(xs) / n
        loss.backward()
    diff = max(float((g - p.grad.float()).abs().max() / (p.grad.float().abs().max() + 1e-12))
               for g, p in zip(grads[0], reference.parameters()))
    lines.append(f"largest relative difference from the by-hand gradient: {diff:.2e} (BatchNorm: piece statistics)")


def check_snapshot(out_dir: Path, lines: list[str]) -> None:
    path = out_dir / "memory_snapshot.pickle"
    x, y = _images(64)
    snap = MemorySnapshot(3, path)
    _trainer(_model(), callbacks=[snap]).fit(DataLoader(TensorDataset(x, y), batch_size=16))
    lines += ["", "## Memory snapshot", "", f"{path}: {path.stat().st_size if path.exists() else 0} bytes"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/memory_check.md")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GB * 2**30 / total))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Memory check, {time.strftime('%Y-%m-%d')}, {torch.cuda.get_device_name()}, torch {torch.__version__}",
             ""]
    largest = check_finder(lines)
    check_recovery(largest, lines)
    check_snapshot(out.parent, lines)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
