"""Checkpoints of an FSDP run with torch.distributed.checkpoint (DCP).

A checkpoint is two things beside each other in `checkpoints/`:
- `NAME.STEP.dcp/`: the sharded model and optimizer state, each rank writing its own shard file
  (`__R_0.distcp`) and rank 0 the `.metadata`; written into `.NAME.STEP.dcp.partial/` and renamed
  once DCP has committed the metadata, so a folder under its name is whole;
- `NAME.ckpt`: the usual torchkiln checkpoint (loop, schedule, RNG, callbacks, config, and the full
  model weights gathered on rank 0's CPU, so `kiln test`, `predict` and `export` read FSDP runs
  as any other), which names its folder and each file's size and SHA-256. It is written after the
  folder, so the checkpoint counts only once both are whole; an older folder is deleted only
  after the .ckpt that replaces it is on disk.

DCP's `.metadata` is pickled. Its hash is checked against the .ckpt (loaded with
weights_only=True) before DCP reads it, and torchkiln reads DCP folders only from the run's own
checkpoint directory: never resume from a run directory you did not write.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from torchkiln.engine import distributed
from torchkiln.errors import CheckpointError

log = logging.getLogger("torchkiln")
SHARDED = "sharded"  # the key of a .ckpt that names its DCP folder
_FOLDER = re.compile(r"(?P<stem>.+)\.(?P<step>\d{6,})\.dcp")


def is_sharded(model: nn.Module | None) -> bool:
    from torchkiln.engine.fsdp import ShardedModel

    return isinstance(model, ShardedModel)


def folder_name(name: str, step: int) -> str:
    return f"{Path(name).stem}.{step:06d}.dcp"


def prepare(trainer: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The Trainer's state for a sharded save: the full weights (rank 0, CPU) for the .ckpt, and the
    sharded model and optimizer state (every rank) for DCP under `state[SHARDED]`."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    trainer.placement.train_model.shard()  # evaluation may have left the parameters gathered
    model, optimizer = trainer.raw_model, trainer.optimizer
    model_sd, optim_sd = get_state_dict(model, optimizer)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {**state, "model": full, "optimizer": None, SHARDED: {"model": model_sd, "optimizer": optim_sd}}


def save(state: dict[str, Any], directory: Path, name: str) -> tuple[dict[str, Any], str]:
    """Write the shards (every rank), then commit the folder (rank 0). Returns the plain state for
    the .ckpt (naming the folder and its files' hashes) and the folder's name."""
    import torch.distributed.checkpoint as dcp

    step = int(state["loop"]["global_step"])
    final = folder_name(name, step)
    partial = directory / f".{final}.partial"
    if distributed.is_rank0() and partial.exists():
        shutil.rmtree(partial)
    distributed.barrier()
    dcp.save(state[SHARDED], checkpoint_id=str(partial))
    manifest = None
    if distributed.is_rank0():
        manifest = {"dir": final, "files": _hashes(partial)}
        _replace_dir(partial, directory / final)
    manifest = distributed.broadcast_object(manifest)
    plain = {k: v for k, v in state.items() if k != SHARDED}
    plain[SHARDED] = manifest
    return plain, final


def drop_older(directory: Path, name: str, keep: str) -> None:
    """After NAME.ckpt names `keep`: the folders of NAME's earlier saves (run on the writer's thread)."""
    stem = Path(name).stem
    for p in directory.glob(f"{stem}.*.dcp"):
        m = _FOLDER.fullmatch(p.name)
        if m and m.group("stem") == stem and p.name != keep:
            shutil.rmtree(p, ignore_errors=True)


def clean_partial(directory: Path) -> None:
    """Folders of a save that was interrupted (its .ckpt was never written)."""
    for p in directory.glob(".*.dcp.partial"):
        shutil.rmtree(p, ignore_errors=True)


def load(trainer: Any, state: dict[str, Any], ckpt: Path) -> None:
    """Resume a sharded checkpoint: the model is sharded first (on the world size of this run; DCP
    reshards when it differs), then the shards are read into it and the optimizer, then the rest
    of the state is loaded as for any checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = verified_folder(ckpt, state[SHARDED])
    trainer.setup()  # shard before reading: each rank reads only its part
    model, optimizer = trainer.raw_model, trainer.optimizer
    model_sd, optim_sd = get_state_dict(model, optimizer)
    shards = {"model": model_sd, "optimizer": optim_sd}
    try:
        with warnings.catch_warnings():  # one process reading a sharded run: intended, not worth a warning
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(shards, checkpoint_id=str(folder), no_dist=not distributed.is_distributed())
    except Exception as exc:  # noqa: BLE001 - DCP raises many kinds for a folder that does not fit
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{folder}: its shards do not fit this model and optimizer ({first})") from None
    set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
    state["model"] = model.state_dict()  # what was just loaded: the Trainer loads the rest around it
    state["optimizer"] = optimizer.state_dict()
    trainer.load_state_dict(state)


def verified_folder(ckpt: Path, manifest: Any) -> Path:
    """The checkpoint's DCP folder, beside it in the run's own directory, every file as the .ckpt
    recorded it (size and SHA-256). Rank 0 checks; every rank gets its verdict."""
    problem = None
    folder = Path(ckpt).parent / str(manifest.get("dir", "")) if isinstance(manifest, dict) else None
    if distributed.is_rank0():
        problem = _check(folder, manifest)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise CheckpointError(f"{ckpt}: {problem}; resume from another checkpoint of the run")
    return folder


def _check(folder: Path | None, manifest: Any) -> str | None:
    if folder is None or not isinstance(manifest.get("files"), dict) or not _FOLDER.fullmatch(folder.name):
        return "its record of the sharded state is not valid"
    if not folder.is_dir():
        return f"its sharded state {folder.name}/ is missing"
    found = _hashes(folder, sizes_only=True)
    if set(found) != set(manifest["files"]):
        extra, missing = sorted(set(found) - set(manifest["files"])), sorted(set(manifest["files"]) - set(found))
        return f"the files of {folder.name}/ differ from those recorded (missing {missing}, unexpected {extra})"
    for fname, (size, digest) in sorted(manifest["files"].items()):
        if found[fname][0] != size:
            return f"{folder.name}/{fname} is truncated or was changed ({found[fname][0]} bytes, recorded {size})"
        if _sha256(folder / fname) != digest:
            return f"{folder.name}/{fname} was changed since it was written (its SHA-256 differs)"
    return None


def _hashes(folder: Path, sizes_only: bool = False) -> dict[str, tuple[int, str | None]]:
    return {p.name: (p.stat().st_size, None if sizes_only else _sha256(p))
            for p in sorted(folder.iterdir()) if p.is_file()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _replace_dir(partial: Path, final: Path) -> None:
    """`partial` under the name `final` (a folder of the same name from an earlier try is replaced)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    try:  # the rename itself reaches the disk
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass

