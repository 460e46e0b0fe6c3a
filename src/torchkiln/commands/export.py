"""`kiln export`: a run's weights as safetensors (or a plain state_dict) plus the model's config.

The files need neither torchkiln nor pickle to read: `safetensors.torch.load_file` gives the
state_dict, and `model.json` says which model (type and arguments) it belongs to.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torchkiln.commands.logs import console
from torchkiln.errors import CheckpointError, ConfigError
from torchkiln.rundir import CHECKPOINTS, EXPORT, LAST, checkpoint_path

FORMATS = ("safetensors", "pt")


def main(args: argparse.Namespace) -> int:
    """Print the paths of the files written."""
    console(quiet=False)
    for path in export(Path(args.run_dir), args.format, args.checkpoint, args.out):
        print(path)
    return 0


def export(run_dir: str | Path, fmt: str = "safetensors", checkpoint: str = "best",
           out_dir: str | Path | None = None) -> list[Path]:
    """Write model.safetensors (or model.pt) and model.json into `out_dir` (default RUN_DIR/export)."""
    import torch

    from torchkiln.engine.checkpoint import (
        FORMAT,
        load_checkpoint,
        model_weights,
        strip_prefixes,
        weights_kind,
    )
    from torchkiln.version import __version__

    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}; found {fmt!r}")
    run_dir = Path(run_dir)
    ckpt = checkpoint_path(run_dir, checkpoint)
    if checkpoint == "best" and not ckpt.is_file() and (run_dir / CHECKPOINTS / LAST).is_file():
        raise CheckpointError(f"{ckpt}: not found (no epoch finished with a monitored value yet);"
                              " use --checkpoint last")
    if not ckpt.is_file() and not (run_dir / CHECKPOINTS).is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (no {CHECKPOINTS}/ folder)")
    state = load_checkpoint(ckpt)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}: not a torchkiln checkpoint")
    weights = {k: v.detach().cpu().contiguous() for k, v in strip_prefixes(model_weights(state, ckpt)).items()}
    config: dict[str, Any] = state.get("config") or {}
    loop = state.get("loop") or {}
    info = {
        "model": config.get("model"),
        **_rebuild_info(config),
        "task": config.get("task"),
        "source_checkpoint": str(ckpt),
        "weights": weights_kind(state),  # ema / swa: the averaged weights the run validated; model: as trained
        "epoch": loop.get("epoch"),
        "global_step": loop.get("global_step"),
        "monitor": (config.get("trainer") or {}).get("monitor"),
        "best": loop.get("best"),
        "torchkiln": __version__,
        "torch": str(torch.__version__),
        "format": fmt,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in weights.items()},
    }
    out = Path(out_dir) if out_dir is not None else run_dir / EXPORT
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        weights_path = out / "model.safetensors"
        meta = {"format": "pt", "torchkiln": __version__, "model_type": str((config.get("model") or {}).get("type"))}
        _atomic(weights_path, lambda p: save_file(_unshare(weights), str(p), metadata=meta))
    else:
        weights_path = out / "model.pt"
        _atomic(weights_path, lambda p: torch.save(weights, p))
    config_path = out / "model.json"
    _atomic(config_path, lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))
    return [weights_path, config_path]


def _rebuild_info(config: dict[str, Any]) -> dict[str, Any]:
    """What rebuilding the model and feeding it needs beyond its type and arguments: the class
    count, the heads of a multi-head task (name -> classes, in output order) and the eval
    preprocessing."""
    model_args = (config.get("model") or {}).get("args") or {}
    task = config.get("task")
    heads = None
    if isinstance(task, dict) and task.get("type") == "multihead":
        spec = (task.get("args") or {}).get("heads") or {}
        heads = {name: (h["classes"] if isinstance(h, dict) else h) for name, h in spec.items()}
    transforms = ((config.get("data") or {}).get("transforms") or {})
    return {
        "num_classes": model_args.get("num_classes"),
        "heads": heads,
        "preprocessing": {
            "eval_transforms": transforms.get("eval") or [],
            "input": "images decoded to float32 RGB (or L) tensors in [0, 1], shape (C, H, W), then the"
                     " eval transforms (torchvision.transforms.v2) in order; tensor data sets as stored",
        },
    }


def _unshare(weights: dict[str, Any]) -> dict[str, Any]:
    """safetensors refuses tensors that share memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _atomic(path: Path, write) -> None:
    import os

    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: could not write ({exc.strerror or exc})") from exc
