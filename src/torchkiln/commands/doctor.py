"""`kiln doctor [-c cfg.yaml]`: what this machine's torch can do, and what will not work well.

It reports the versions (torch, CUDA, cuDNN, NCCL, torchvision, timm, torchmetrics), the GPUs
(memory, compute capability, bf16/fp16), the CPU's matrix units (AMX) and the installed extras.
It warns about: torch older than 2.6 (`torch.load(weights_only=True)` was bypassable,
CVE-2025-32434); fp16 or bf16 where they will run on a CPU without the units for them (with a
config: its precision; without: a note); a GPU that is visible but that torch cannot use. The exit
code is 0 when nothing is wrong, 1 when something is.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
from typing import Any

EXTRAS = {"tune": ["ray", "optuna"], "export": ["onnx", "onnxscript", "onnxruntime"], "wandb": ["wandb"],
          "detection": ["pycocotools|faster_coco_eval"]}
LIBRARIES = ("torchvision", "timm", "torchmetrics")
SAFE_TORCH = (2, 6)


def main(args: argparse.Namespace) -> int:
    precision = None
    if getattr(args, "config", None) or getattr(args, "overrides", None):
        from torchkiln.config.load import load_config

        cfg = load_config(args.config, args.overrides)
        precision = (cfg.trainer.precision, cfg.trainer.device)
    found = facts()
    for line in report(found):
        print(line)
    issues = problems(found, precision)
    for issue in issues:
        print(f"warning: {issue}")
    print(f"{len(issues)} problem(s) found" if issues else "ok: nothing wrong found")
    return 1 if issues else 0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _has(module: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in module.split("|"))


def _cpu_flags() -> set[str]:
    from torchkiln.engine.step import _cpu_flags as flags

    return flags()


def facts() -> dict[str, Any]:
    """Everything the report and the checks read, as plain data (the checks are tested on made-up facts)."""
    import torch

    cuda = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"name": p.name, "memory": p.total_memory, "capability": f"{p.major}.{p.minor}",
                     "bf16": torch.cuda.is_bf16_supported() if i == 0 else None,
                     "supported": f"sm_{p.major}{p.minor}" in torch.cuda.get_arch_list()})
    nccl = None
    if torch.version.cuda and hasattr(torch.cuda, "nccl"):
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except (RuntimeError, AttributeError):
            nccl = None
    flags = _cpu_flags()
    return {
        "torch": str(torch.__version__).split("+")[0], "torch_build": str(torch.__version__),
        "cuda": torch.version.cuda, "cudnn": _cudnn(torch), "nccl": nccl, "cuda_available": cuda, "gpus": gpus,
        "libraries": {name: _version(name) for name in LIBRARIES},
        "amx": sorted(f for f in flags if f.startswith("amx")),
        "extras": {extra: all(_has(m) for m in mods) for extra, mods in EXTRAS.items()},
        "gpu_visible": _gpu_visible(),
    }


def _cudnn(torch: Any) -> str | None:
    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v and v >= 90000 else (str(v) if v else None)


def _gpu_visible() -> str | None:
    """Evidence of an NVIDIA GPU on this machine, whatever torch thinks (None: none seen)."""
    if os.path.exists("/dev/nvidia0"):
        return "/dev/nvidia0"
    if shutil.which("nvidia-smi"):
        return "nvidia-smi"
    return None


def report(f: dict[str, Any]) -> list[str]:
    gib = 2**30
    lines = [f"torch        {f['torch_build']}", f"CUDA         {f['cuda'] or 'none (CPU build)'}",
             f"cuDNN        {f['cudnn'] or '-'}", f"NCCL         {f['nccl'] or '-'}"]
    lines += [f"{name:<12} {v or 'not installed'}" for name, v in f["libraries"].items()]
    if f["gpus"]:
        for i, g in enumerate(f["gpus"]):
            halves = "bf16 and fp16" if g["bf16"] or g["bf16"] is None and float(g["capability"]) >= 8 else "fp16 only"
            lines.append(f"GPU {i}        {g['name']}, {g['memory'] / gib:.1f} GiB, compute capability"
                         f" {g['capability']}, {halves}")
    else:
        lines.append("GPU          none usable")
    lines.append(f"CPU AMX      {', '.join(f['amx']) if f['amx'] else 'none (bf16/fp16 on the CPU are emulated: slow)'}")
    lines.append("extras       " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in f["extras"].items()))
    return lines


def problems(f: dict[str, Any], precision: tuple[str, str] | None = None) -> list[str]:
    """What is wrong: each a line that says what and what to do."""
    out = []
    try:
        version = tuple(int(x) for x in f["torch"].split(".")[:2])
    except ValueError:
        version = SAFE_TORCH
    if version < SAFE_TORCH:
        out.append(f"torch {f['torch']} is older than 2.6: torch.load(weights_only=True) can be bypassed"
                   " (CVE-2025-32434), so a checkpoint from elsewhere can run code; upgrade torch")
    if f["gpu_visible"] and not f["cuda_available"]:
        why = "this torch is a CPU build" if not f["cuda"] else "the driver or CUDA_VISIBLE_DEVICES does not let it"
        out.append(f"a GPU is visible ({f['gpu_visible']}) but torch cannot use it: {why}; install the CUDA build"
                   " of torch that matches the driver (pytorch.org/get-started)")
    for i, g in enumerate(f["gpus"]):
        if not g["supported"]:
            out.append(f"GPU {i} ({g['name']}, compute capability {g['capability']}) is not in this torch build's"
                       " architectures: kernels may fail; install a torch build that supports it")
    if precision is not None:
        prec, device = precision
        on_cpu = device == "cpu" or (device == "auto" and not f["cuda_available"])
        unit = {"bf16": "amx_bf16", "fp16": "amx_fp16"}.get(prec)
        if on_cpu and unit and unit not in f["amx"]:
            out.append(f"trainer.precision: {prec} will run on this CPU, which lacks {unit}: it is emulated and"
                       " slower than 32 (fp16 many times); use trainer.precision=32 here")
    return out
