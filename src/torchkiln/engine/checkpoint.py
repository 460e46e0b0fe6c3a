"""Checkpoints that are always whole (temp file, fsync, rename) and load safely (weights_only)."""

from __future__ import annotations

import errno
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from torchkiln.errors import CheckpointError

FORMAT = "torchkiln-checkpoint"
TMP_PREFIX = ".tmp-"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write atomically: the final name never holds a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise CheckpointError(
            f"{path}: could not write checkpoint ({reason}); the previous checkpoint is intact"
        ) from exc
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale_temps(directory: str | Path) -> list[Path]:
    """Remove temp files left by a process that died while writing."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for p in directory.glob(f"{TMP_PREFIX}*"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True; never retry without it. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        first = text.strip().splitlines()[0] if text.strip() else ""
        if "weights_only" in text or "Unsupported" in text or "GLOBAL" in text:
            found = re.search(r"Unsupported (?:global|operand)[^.]*?(GLOBAL [\w.]+|\d+)", text)
            what = f" ({found.group(0)})" if found else ""
            raise CheckpointError(
                f"{path}: refused to load: it holds pickled objects beyond plain tensors and data,"
                f" which could run code; nothing in it was executed{what}"
            ) from exc
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupted or truncated): {first[:120]}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted): {first[:120]}") from exc
    return state


def model_weights(state: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state_dict inside a torchkiln checkpoint, or the file itself if it is a state_dict."""
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return state["model"]
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state
    raise CheckpointError(f"{path}: neither a torchkiln checkpoint nor a state_dict")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove torch.compile's `_orig_mod.` and DDP's `module.` prefixes from keys."""
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace("._orig_mod.", ".")] = v
    return out
