"""The forms a `tune.space` entry takes, one key each: `{loguniform: [1.0e-4, 1.0e-1]}`,
`{uniform: [0.0, 0.2]}`, `{randint: [16, 64]}` (64 excluded, as in Ray), `{choice: [32, 64]}`,
`{grid: [a, b, c]}` (every value, each `num_samples` times). Plain data, checked by the schema;
`to_ray` turns one into Ray Tune's sampler only when a search starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchkiln.errors import did_you_mean

RANGES = ("loguniform", "uniform", "randint")
LISTS = ("choice", "grid")
KINDS = RANGES + LISTS


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple[Any, ...]

    def edges(self) -> list[Any]:
        """The values that show whether every value it can take is valid: a range's two ends
        (randint: its largest value), every value of a list."""
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def to_ray(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


def parse(spec: Any) -> Distribution:
    """One entry of `tune.space`; a ValueError says what is wrong with it."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"expected one of {{{': ..., '.join(KINDS)}: ...}}, e.g. {{loguniform: [1.0e-4, 1.0e-1]}}")
    ((kind, args),) = spec.items()
    if kind not in KINDS:
        hint = did_you_mean(str(kind), KINDS)
        known = "" if hint else f" (known: {', '.join(KINDS)})"
        raise ValueError(f"unknown distribution '{kind}'{hint}{known}")
    if not isinstance(args, list) or not args:
        raise ValueError(f"{kind}: expected a list of values; found {args!r}")
    if kind in LISTS:
        return Distribution(kind, tuple(args))
    return Distribution(kind, _range(kind, args))


def _range(kind: str, args: list[Any]) -> tuple[Any, ...]:
    number = int if kind == "randint" else (int, float)
    if len(args) != 2 or not all(isinstance(a, number) and not isinstance(a, bool) for a in args):
        what = "integers" if kind == "randint" else "numbers"
        raise ValueError(f"{kind}: expected [low, high], two {what}; found {args!r}")
    low, high = args
    if not low < high:
        raise ValueError(f"{kind}: low must be below high; found {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"loguniform: low must be above 0; found {args!r}")
    if kind == "randint" and high - low < 1:
        raise ValueError(f"randint: high is excluded, so it must exceed low by at least 1; found {args!r}")
    return (low, high) if kind == "randint" else (float(low), float(high))


def parse_space(space: dict[str, Any]) -> dict[str, Distribution]:
    """Every entry of `tune.space`; a ValueError names the key."""
    out = {}
    for key, spec in space.items():
        try:
            out[key] = parse(spec)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    return out
