"""The searched keys, checked before Ray starts, and a trial's config from its sampled values.

A key is the config's own dotted path (`optimizer.args.lr`, `data.batch_size`, `loss.0.weight`).
A key of the schema must exist (a typo names the closest key); a key under a component's `args`
must be an argument its type accepts. Every value a distribution can take at its edges (a range's
two ends, each value of a list) must pass the config's validation, with the other keys as they are.
"""

from __future__ import annotations

import copy
from typing import Any

from torchkiln.config.load import resolve
from torchkiln.config.schema import Config, to_plain
from torchkiln.errors import ConfigError, did_you_mean
from torchkiln.tune.distributions import Distribution, parse_space


def with_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the plain config `data` with each dotted key set to its value."""
    out = copy.deepcopy(data)
    for key, value in values.items():
        *parents, last = key.split(".")
        node: Any = out
        for part in parents:
            child = node[int(part)] if isinstance(node, list) else node.get(part)
            if child is None:
                child = {}
                node[part] = child
            node = child
        if isinstance(node, list):
            node[int(last)] = plain_value(value)
        else:
            node[last] = plain_value(value)
    return out


def plain_value(value: Any) -> Any:
    """Ray's samples as plain Python (numpy scalars -> int/float), so config.yaml can hold them."""
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return value.item() if hasattr(value, "item") and not isinstance(value, (int, float, str)) else value


def check_space(cfg: Config, source: str) -> dict[str, Distribution]:
    """Every key of `cfg.tune.space` exists and every edge value passes config validation."""
    from torchkiln.config.build import check_components

    space = parse_space(cfg.tune.space)
    if not space:
        raise ConfigError(f"{source}: tune.space: empty; name the keys to search, e.g."
                          " tune.space: {optimizer.args.lr: {loguniform: [1.0e-4, 1.0e-1]}}")
    data = to_plain(cfg)
    for key, dist in space.items():
        _check_key(data, key, source)
        for value in dist.edges():
            try:
                check_components(resolve(with_values(data, {key: value}), source))
            except ConfigError as exc:
                reason = str(exc).removeprefix(f"{source}: ")
                raise ConfigError(f"{source}: tune.space.{key}: the value {value!r} is refused: {reason}") from None
    return space


def _check_key(data: dict[str, Any], key: str, source: str) -> None:
    """The dotted key names a place in the config; below a component's `args`, its arguments are
    checked by the component's signature instead (with each value)."""
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the top level"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: tune.space.{key}: '{part}' is not an index of {where}"
                                  f" (a list of {len(node)})")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                if i > 0 and parts[i - 1] == "args":
                    return
                hint = did_you_mean(part, node) or f" (keys of {where}: {', '.join(node)})"
                raise ConfigError(f"{source}: tune.space.{key}: no key '{part}' in {where}{hint}")
            if node[part] is None and i < len(parts) - 1:
                raise ConfigError(f"{source}: tune.space.{key}: {'.'.join(parts[:i + 1])} is not set in"
                                  " the config; give it there first, then search its keys")
            node = node[part]
        else:
            raise ConfigError(f"{source}: tune.space.{key}: {where} is a value, not a section")
