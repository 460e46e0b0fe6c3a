"""Load local pretrained weights into a model, head-aware, with a report of what did not fit."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from torchkiln.engine.checkpoint import FORMAT, load_checkpoint, model_weights, strip_prefixes
from torchkiln.errors import CheckpointError
from torchkiln.models.heads import in_head

log = logging.getLogger("torchkiln")

# Keys whose absence is harmless: BatchNorm fills num_batches_tracked itself.
_BENIGN_MISSING = ("num_batches_tracked",)


@dataclass
class LoadReport:
    """What `load_pretrained` did; every list holds state_dict keys."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file (outside the head)
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # shapes differ outside the head (skipped)
    head_kept: list[str] = field(default_factory=list)  # head tensors left as initialised
    adapted: list[str] = field(default_factory=list)  # input convs summed/repeated to the model's channels

    def log(self) -> None:
        """Expected outcomes at INFO; anything left out of the load at WARNING."""
        log.info("pretrained: loaded %d tensors from %s", len(self.loaded), self.path)
        if self.adapted:
            log.info("pretrained: adapted to the model's input channels: %s", _some(self.adapted))
        if self.head_kept:
            log.info("pretrained: new head (not loaded): %s", _some(self.head_kept))
        if self.missing:
            log.warning("pretrained: missing from the file, left as initialised: %s", _some(self.missing))
        if self.unexpected:
            log.warning("pretrained: unexpected in the file, ignored: %s", _some(self.unexpected))
        if self.mismatched:
            log.warning("pretrained: shape mismatch, skipped (strict: false): %s", _some(self.mismatched))


def _some(keys: list[str], n: int = 5) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .safetensors file, a .pth/.pt state_dict, or a torchkiln checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.pretrained: {path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"model.pretrained: {path}: not a readable safetensors file: {exc}") from exc
    state = load_checkpoint(path)  # weights_only=True
    if isinstance(state, dict) and state.get("format") != FORMAT:
        for key in ("state_dict", "model"):  # common wrappers of plain state_dicts
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    return model_weights(state, f"model.pretrained: {path}")


def _adapt_input_conv(w: torch.Tensor, in_ch: int) -> torch.Tensor:
    """RGB filters to `in_ch` channels: summed for one channel, else repeated and rescaled."""
    if in_ch == 1:
        return w.sum(dim=1, keepdim=True)
    reps = -(-in_ch // w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_ch] * (w.shape[1] / in_ch)


def load_pretrained(model: nn.Module, path: str | Path, *, strict: bool = True, head: str | None = None,
                    reset_head: bool = False) -> LoadReport:
    """Load what fits; head tensors that do not fit (or all of them with `reset_head`) stay new.

    With `strict`, model weights missing from the file and shape mismatches outside the head are
    refused; without it they are skipped and reported. Unexpected keys are always only reported.
    """
    weights = strip_prefixes(read_weights(path))
    own = model.state_dict()
    report = LoadReport(str(path))
    first_conv = next((k for k, v in own.items() if k.endswith("weight") and v.dim() == 4), None)
    take: dict[str, torch.Tensor] = {}
    for key, mine in own.items():
        theirs = weights.get(key)
        if in_head(key, head) and (reset_head or theirs is None or theirs.shape != mine.shape):
            report.head_kept.append(key)
            continue
        if theirs is None:
            if not key.endswith(_BENIGN_MISSING):
                report.missing.append(key)
            continue
        if theirs.shape != mine.shape:
            if key == first_conv and theirs.dim() == 4 and theirs.shape[0] == mine.shape[0] \
                    and theirs.shape[2:] == mine.shape[2:]:
                take[key] = _adapt_input_conv(theirs.to(mine.dtype), mine.shape[1])
                report.adapted.append(f"{key} {tuple(theirs.shape)} -> {tuple(mine.shape)}")
                continue
            report.mismatched.append(f"{key} file {tuple(theirs.shape)} vs model {tuple(mine.shape)}")
            continue
        take[key] = theirs
    report.unexpected = [k for k in weights if k not in own]
    report.loaded = list(take)

    where = f"model.pretrained: {path}"
    if not take:
        hint = f" (file keys look like '{next(iter(weights), '')}', model keys like '{next(iter(own), '')}')"
        raise CheckpointError(f"{where}: none of its {len(weights)} tensors fit the model{hint}")
    if strict and report.mismatched:
        raise CheckpointError(f"{where}: shapes differ outside the head: {_some(report.mismatched, 3)};"
                              f" set model.strict: false to skip them (or model.head if that is the head)")
    if strict and report.missing:
        raise CheckpointError(f"{where}: {len(report.missing)} model tensors are not in the file:"
                              f" {_some(report.missing, 3)}; set model.strict: false to leave them initialised")
    model.load_state_dict(take, strict=False)
    report.log()
    return report
