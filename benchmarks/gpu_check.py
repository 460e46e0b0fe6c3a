"""GPU check: ResNet-50 on synthetic 224x224 images through torchkiln's Trainer, beside a hand-written loop.

Prints a Markdown table of images/s and peak GPU memory for fp32, bf16, fp16, bf16 + channels_last
and bf16 + torch.compile, then the peak allocated device memory while a ResNet-50 + AdamW
checkpoint is written (target: at most 1% above the state alone). Exits 0 with "skipped: no
CUDA" where there is no GPU. Run it at `--batch 64` and `--batch 256`.

    python benchmarks/gpu_check.py            # 5 warm-up + 30 timed steps of batch 64 per variant
    python benchmarks/gpu_check.py --quick    # 3 + 10 steps

Uses the Python API only (no config, no pydantic), so it runs wherever torch and torchvision do.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

# Run from a checkout: measure the torchkiln beside this script, installed or not.
_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "torchkiln").is_dir():
    sys.path.insert(0, str(_SRC))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from torchkiln.engine.settings import make_trainer  # noqa: E402

VARIANTS = {
    # name: (loop, precision, channels_last, compile)
    "trainer-fp32": ("trainer", "32", False, False),
    "hand-fp32": ("hand", "32", False, False),
    "trainer-bf16": ("trainer", "bf16", False, False),
    "hand-bf16": ("hand", "bf16", False, False),
    "trainer-fp16": ("trainer", "fp16", False, False),
    "hand-fp16": ("hand", "fp16", False, False),
    "trainer-bf16-channels_last": ("trainer", "bf16", True, False),
    "hand-bf16-channels_last": ("hand", "bf16", True, False),
    "trainer-bf16-compile": ("trainer", "bf16", False, True),
}
DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TimedBatches:
    """`warmup + steps` copies of one batch already on the device; times the steps after warm-up.

    The trainer asks for batch `warmup` once the warm-up steps were issued, and for the end of the
    iterator once the last step was issued; both moments synchronize the device first.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int):
        self.x, self.y, self.warmup, self.steps = x, y, warmup, steps
        self.seconds = float("nan")

    def __len__(self) -> int:
        return self.warmup + self.steps

    def __iter__(self):
        start = None
        for i in range(len(self)):
            if i == self.warmup:
                sync(self.x.device)
                if self.x.device.type == "cuda":  # peak memory of steady-state training steps
                    torch.cuda.reset_peak_memory_stats(self.x.device)
                start = time.perf_counter()
            yield self.x, self.y
        sync(self.x.device)
        self.seconds = time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(arch: str, channels_last: bool, device: torch.device) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=1000)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    return model.to(device, memory_format=fmt)


def run_trainer(model, batches: TimedBatches, precision: str, channels_last: bool, compile: bool,
                device: torch.device) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = make_trainer(model, opt, nn.CrossEntropyLoss(), device=device, precision=precision,
                      channels_last=channels_last, compile=compile, epochs=1, progress=False,
                      train_metrics=False, monitor="train/loss")
    summary = trainer.fit(batches)
    return summary["final"]["train/loss"]


def run_hand(model, batches: TimedBatches, precision: str, channels_last: bool, device: torch.device) -> float:
    """The textbook loop, nothing else."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    model.train()
    losses = []
    for x, y in batches:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        losses.append(loss.detach())
    return float(torch.stack(losses).float().mean())


def measure(name: str, args, device: torch.device) -> dict:
    loop, precision, channels_last, compile = VARIANTS[name]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    batches = TimedBatches(x, y, args.warmup, args.steps)
    model = make_model(args.arch, channels_last, device)
    started = time.perf_counter()
    if loop == "trainer":
        loss = run_trainer(model, batches, precision, channels_last, compile, device)
    else:
        loss = run_hand(model, batches, precision, channels_last, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    result = {
        "variant": name, "loop": loop, "precision": precision, "channels_last": channels_last,
        "compile": compile, "images_per_s": args.batch * args.steps / batches.seconds,
        "step_ms": 1000 * batches.seconds / args.steps, "peak_gib": peak, "loss": loss,
        "wall_s": time.perf_counter() - started,
    }
    del model, batches, x, y
    return result


def table(results: list[dict]) -> str:
    hand = {(r["precision"], r["channels_last"]): r["images_per_s"] for r in results if r["loop"] == "hand"}
    lines = ["| variant | images/s | ms/step | peak memory, timed steps (GiB) | vs hand loop | mean loss | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ref = hand.get((r["precision"], r["channels_last"]))
        ratio = f"{r['images_per_s'] / ref:.2f}x" if ref and r["loop"] == "trainer" else ""
        lines.append(f"| {r['variant']} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} |"
                     f" {ratio} | {r['loss']:.3f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def checkpoint_memory(arch: str, device: torch.device, directory: Path) -> str:
    """Peak allocated device memory while a ResNet-50 + AdamW checkpoint is written, inline and in
    the background (one pinned host snapshot), against the peak of the state alone."""
    from torchkiln.engine.checkpoint import CheckpointWriter, save_checkpoint

    model = make_model(arch, False, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for q in model.parameters():
        q.grad = torch.randn_like(q)
    opt.step()
    opt.zero_grad(set_to_none=True)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    sync(device)
    lines = ["| checkpoint of " + arch + " + AdamW | peak allocated (GiB) | x state alone | seconds |",
             "|---|---:|---:|---:|"]
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.max_memory_allocated(device)
    lines.append(f"| state alone | {base / 2**30:.3f} | 1.000x | - |")
    for label, save in (("save_checkpoint (inline)", lambda: save_checkpoint(state, directory / "inline.ckpt")),
                        ("CheckpointWriter (background)", lambda: _background(CheckpointWriter, state, directory))):
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        save()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device)
        lines.append(f"| {label} | {peak / 2**30:.3f} | {peak / base:.3f}x | {seconds:.2f} |")
    return "\n".join(lines)


def _background(writer_cls, state: dict, directory: Path) -> None:
    writer = writer_cls(background=True)
    try:
        writer.save(state, directory / "background.ckpt")
        writer.wait()
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 warm-up + 10 timed steps")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--arch", default="resnet50", help="a torchvision.models constructor")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to smoke-test this script")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--no-checkpoint", action="store_true", help="skip the checkpoint memory check")
    args = p.parse_args(argv)
    args.steps = args.steps or (10 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"skipped: no CUDA (torch {torch.__version__} sees no GPU); nothing was measured")
        return 0
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, in both loops
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import torchvision

    print(f"# gpu_check: {args.arch}, batch {args.batch}, {args.image_size}x{args.image_size}, "
          f"{args.warmup} warm-up + {args.steps} timed steps; {gpu}; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}", flush=True)
    results = []
    for name in names:
        try:
            r = measure(name, args, device)
        except Exception as exc:  # noqa: BLE001 - report the variant and go on with the others
            print(f"{name}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            continue
        results.append(r)
        print(f"{name}: {r['images_per_s']:.0f} images/s, peak {r['peak_gib']:.2f} GiB, "
              f"{r['wall_s']:.1f}s", flush=True)
    print()
    print(table(results))
    if device.type == "cuda" and not args.no_checkpoint:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            print()
            print(checkpoint_memory(args.arch, device, Path(tmp)), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if len(results) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
