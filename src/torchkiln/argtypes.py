"""Is a config value of a kind a factory's parameter can take? Judged from the parameter's type hint,
or from its default when it has none, so that `lr: abc` is refused at config check, naming the key,
instead of failing inside the optimizer. Only clear mismatches are refused: a value is accepted
whenever the hint is something this module does not know (a class, a callable, Any)."""

from __future__ import annotations

import collections.abc as abc
import inspect
import types
import typing
from typing import Any

WORDS = {"number": "a number", "bool": "true or false", "str": "a string", "list": "a list", "dict": "a mapping"}


def kind_of(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return None


def accepted_kinds(hint: Any) -> set[str] | None:
    """The value kinds a type hint admits; None: anything (a hint this module does not judge)."""
    if hint is type(None):
        return set()
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        kinds: set[str] = set()
        for member in typing.get_args(hint):
            sub = accepted_kinds(member)
            if sub is None:
                return None
            kinds |= sub
        return kinds
    if origin is typing.Literal:
        return {k for k in map(kind_of, typing.get_args(hint)) if k is not None}
    if origin is typing.Annotated:
        return accepted_kinds(typing.get_args(hint)[0])
    base = origin or hint
    if base is bool:
        return {"bool"}
    if base in (int, float, complex):
        return {"number"}
    if base is str:
        return {"str"}
    if base in (list, tuple, set, frozenset, abc.Sequence, abc.Iterable, abc.Collection):
        return {"list"}
    if base in (dict, abc.Mapping):
        return {"dict"}
    if getattr(base, "__name__", "") == "Tensor":  # a number or nested lists become a tensor
        return {"number", "list"}
    return None


def _default_kinds(default: Any) -> set[str] | None:
    """For a parameter without a hint: what its default suggests (lists also pass where a number is
    the default: several factories take a number or one per parameter group)."""
    if default is None or default is inspect.Parameter.empty:
        return None
    kind = kind_of(default)
    if kind == "number":
        return {"number", "list"}
    return {kind} if kind is not None else None


def hints_of(factory: Any) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable hints: fall back to the defaults
        return {}


def mismatch(param: inspect.Parameter, hint: Any, value: Any) -> str | None:
    """What the value should have been (words for the error), or None when it may be right."""
    if value is None:  # stands for "not set" everywhere in the config
        return None
    kinds = accepted_kinds(hint) if hint is not None else _default_kinds(param.default)
    kind = kind_of(value)
    if kinds is None or kind is None or kind in kinds or not kinds:
        return None
    return " or ".join(WORDS[k] for k in WORDS if k in kinds)
