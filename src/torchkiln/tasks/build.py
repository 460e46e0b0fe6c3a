"""Building a task from its config entry (`task: name` or `{type, args}`)."""

from __future__ import annotations

from typing import Any

from torchkiln.registry import TASKS, check_args, construct


def build_task(spec: Any, where: str = "task"):
    """`task: name` or `task: {type, args}` (a registered name or an import path) -> a Task."""
    if isinstance(spec, str):
        name, args = spec, {}
    elif isinstance(spec, dict):
        name, args = spec["type"], dict(spec.get("args") or {})
    else:
        name, args = spec.type, dict(spec.args)
    factory = TASKS.get(name, where)
    check_args(factory, args, f"{where}.args")
    return construct(factory, args, where, f"task '{name}'")
