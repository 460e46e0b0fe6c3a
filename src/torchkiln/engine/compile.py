"""torch.compile for the Trainer: options passed through, dynamo's cache limit, recompiles reported.

The trainer keeps the uncompiled module for state_dicts, so checkpoints never carry
`_orig_mod.` key prefixes and load whether compile is on or off.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from torchkiln.errors import SettingError

log = logging.getLogger("torchkiln")


def compile_model(model: nn.Module, options: dict[str, Any] | None = None,
                  cache_size_limit: int | None = None) -> nn.Module:
    """`torch.compile(model, **options)`; `cache_size_limit` sets dynamo's per-code-object limit."""
    import torch._dynamo

    if cache_size_limit is not None:
        torch._dynamo.config.cache_size_limit = int(cache_size_limit)
    try:
        return torch.compile(model, **dict(options or {}))
    except TypeError as exc:
        raise SettingError("compile_options", f"torch.compile refused them: {exc}") from exc


def dynamo_stats() -> dict[str, Any]:
    """A snapshot of dynamo's process-wide counters (frames, graphs, guard failures)."""
    from torch._dynamo import utils

    counters = utils.counters
    failures = getattr(utils, "guard_failures", {}) or {}
    return {
        "frames": int(counters["frames"].get("total", 0)),
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "recompiles": int(sum(len(v) for v in failures.values())),
        "reasons": [str(r) for v in failures.values() for r in v],
    }


def report_compilation(before: dict[str, Any]) -> dict[str, Any]:
    """Log what dynamo compiled since `before`: graphs, graph breaks and recompilations."""
    now = dynamo_stats()
    out = {k: now[k] - before[k] for k in ("frames", "graphs", "graph_breaks", "recompiles")}
    reasons = now["reasons"][len(before["reasons"]):]
    limit = torch._dynamo.config.cache_size_limit
    log.info("torch.compile: %d graphs compiled, %d graph breaks, %d recompilations"
             " (dynamo cache_size_limit %d)", out["graphs"], out["graph_breaks"], out["recompiles"], limit)
    for reason in reasons[:5]:
        log.info("torch.compile recompiled because: %s", reason.strip().splitlines()[0][:200])
    if len(reasons) > 5:
        log.info("torch.compile: %d more recompile reasons not shown", len(reasons) - 5)
    return out
