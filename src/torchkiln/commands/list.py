"""`kiln list [KIND] [--filter TEXT]`: every registered component, where it comes from and its signature."""

from __future__ import annotations

import argparse
import fnmatch
import inspect
from collections.abc import Callable

from torchkiln.errors import ConfigError, did_you_mean
from torchkiln.registry import KINDS, load_builtins


def signature(factory: Callable) -> str:
    """The arguments a config's `args` can give (the factory's signature), or '(...)' if unknown."""
    try:
        return str(inspect.signature(factory))
    except (TypeError, ValueError):
        return "(...)"


def matches(name: str, pattern: str | None) -> bool:
    """A case-insensitive substring, or a glob when the pattern has * or ?."""
    if not pattern:
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatch(name.lower(), pattern.lower())
    return pattern.lower() in name.lower()


def rows(kind: str, pattern: str | None) -> list[tuple[str, str, str]]:
    return [(name, source, signature(factory)) for name, source, factory in KINDS[kind].entries()
            if matches(name, pattern)]


def main(args: argparse.Namespace) -> int:
    kinds = list(KINDS)
    if args.kind is not None:
        if args.kind not in KINDS:
            singular = {("loss" if k == "losses" else k[:-1]): k for k in KINDS}
            if args.kind not in singular:
                raise ConfigError(f"kiln list: unknown kind '{args.kind}'{did_you_mean(args.kind, kinds)}"
                                  f" (kinds: {', '.join(kinds)})")
            args.kind = singular[args.kind]
        kinds = [args.kind]
    load_builtins()
    found = 0
    for kind in kinds:
        table = rows(kind, args.filter)
        found += len(table)
        if not table:
            continue
        print(f"{kind} ({len(table)})")
        width = max(len(r[0]) for r in table)
        source_width = max(len(r[1]) for r in table)
        for name, source, sig in table:
            print(f"  {name:<{width}}  {source:<{source_width}}  {sig}")
    if found == 0:
        print(f"no {' or '.join(kinds)} matching '{args.filter}'" if args.filter else "nothing registered")
    return 0
