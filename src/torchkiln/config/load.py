"""Read a config file, apply dotted overrides, validate, and explain any error in one line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from torchkiln.config.schema import Config, to_plain
from torchkiln.config.yamlio import DuplicateKeyError, dump_yaml_data, load_yaml
from torchkiln.errors import ConfigError, SettingError, did_you_mean

DEFAULT_CONFIG = "default.yaml"


def default_config_path() -> Path:
    return Path(str(resources.files("torchkiln") / "configs" / DEFAULT_CONFIG))


def add_import_roots(config_path: Path) -> None:
    """Import paths to the user's own modules (`mydata:RankNpz`) resolve from the config file's
    folder and the working directory, with no PYTHONPATH; appended, so installed packages win."""
    for root in (str(config_path.resolve().parent), os.getcwd()):
        if root not in sys.path:
            sys.path.append(root)


def read_file(path: str | Path) -> dict[str, Any]:
    """YAML (safe tags only, YAML 1.2 floats, no key given twice) or JSON, by extension; a mapping
    at the top."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file; give the path of a YAML or JSON file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    add_import_roots(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text) if text.strip() else None
        else:
            data = load_yaml(text)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(
            f"{path}{where}: refused YAML tag: {exc.problem}; configs hold plain data only"
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: line {exc.lineno}: malformed JSON: {exc.msg}") from exc
    if data is None and _blank(text):
        what = "is empty" if not text.strip() else "holds only comments"
        raise ConfigError(f"{path}: the file {what}, no settings; write them in it (`kiln config show >"
                          f" {path.name}` gives the default config to start from, `kiln new NAME` a project)")
    if not isinstance(data, dict):
        found = "null" if data is None else type(data).__name__
        raise ConfigError(f"{path}: expected a mapping of keys at the top, found {found}")
    from torchkiln.config.migrate import from_template, is_template

    return from_template(data, str(path)) if is_template(data) else data


def _blank(text: str) -> bool:
    """Nothing but blank lines and comments."""
    return all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected key.path=value, e.g. trainer.epochs=3")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except DuplicateKeyError as exc:
        raise ConfigError(f"override '{text}': duplicate key '{key.strip()}.{exc.key_path}'; keep one"
                          " of them") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not a YAML scalar, list or mapping") from exc
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys (`optimizer.args.lr=0.01`, `metrics.0=f1_macro`) in place."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            nxt = _child(node, part, text)
            if nxt is None:
                nxt = {}
                _set(node, part, nxt, text)
            elif not isinstance(nxt, (dict, list)):
                raise ConfigError(f"override '{text}': '{'.'.join(path[: i + 1])}' is a value, not a section")
            node = nxt
        _set(node, path[-1], value, text)
    return data


def _child(node: Any, part: str, text: str) -> Any:
    if isinstance(node, list):
        idx = _index(node, part, text)
        return node[idx] if idx < len(node) else None
    return node.get(part)


def _set(node: Any, part: str, value: Any, text: str) -> None:
    if isinstance(node, list):
        idx = _index(node, part, text)
        if idx == len(node):
            node.append(value)
        else:
            node[idx] = value
    else:
        node[part] = value


def _index(node: list, part: str, text: str) -> int:
    if not part.isdigit() or int(part) > len(node):
        raise ConfigError(f"override '{text}': '{part}' is not an index of a list of {len(node)}")
    return int(part)


def _explain(exc: ValidationError, source: str) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    # Drop pydantic's union-branch labels (e.g. 'Component', 'list[...]') from the path.
    loc = [p for p in loc if not (p[:1].isupper() or "[" in p or p in {"str", "function-after"})]
    path = ".".join(loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(Config, loc[:-1])
        choices = list(parent.model_fields) if parent else []
        hint = did_you_mean(loc[-1], choices)
        expected = f" (valid keys: {', '.join(choices)})" if choices and not hint else ""
        return ConfigError(f"{source}: {path}: unknown key{hint}{expected}")
    if kind == "missing":
        return ConfigError(f"{source}: {path}: required key is missing")
    found = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(found, dict):  # a check across several keys: the message says it all
        return ConfigError(f"{source}: {path}: {msg}")
    return ConfigError(f"{source}: {path}: {msg}; found {found!r}")


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    import typing

    current: Any = model
    for part in loc:
        if part.isdigit():
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return None
        current = _first_model(field.annotation, typing)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _first_model(annotation: Any, typing: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg, typing)
        if found is not None:
            return found
    return None


def resolve(data: dict[str, Any], source: str = "config") -> Config:
    """Validate plain data into a Config."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source) from exc


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The packaged default config when `path` is None; overrides applied before validation."""
    path = Path(path) if path is not None else default_config_path()
    data = apply_overrides(read_file(path), list(overrides or []))
    source = str(path) if not overrides else f"{path} (with overrides)"
    return resolve(data, source)


@contextlib.contextmanager
def config_errors_from(source: str | None):
    """A ConfigError raised inside names `source` (the config file) first, once; an engine part's
    SettingError names its parameter, which becomes the config's key path here."""
    try:
        yield
    except SettingError as exc:
        message = f"{config_key(exc.setting)}: {exc.detail}"
        raise ConfigError(f"{source}: {message}" if source else message) from exc
    except ConfigError as exc:
        if source and not str(exc).startswith(f"{source}:"):
            raise ConfigError(f"{source}: {exc}") from exc
        raise


# Engine parameters whose config key is not `trainer.<parameter>`.
SETTING_KEYS = {"scheduler_interval": "scheduler.interval", "log_every_n_steps": "logging.every_n_steps",
                "scheduler_fractional_epochs": "scheduler.unit", "warmup_steps": "scheduler.warmup",
                "warmup_start": "scheduler.warmup.start_factor"}


def config_key(setting: str) -> str:
    return SETTING_KEYS.get(setting, f"trainer.{setting}")


def load_checked(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """load_config, then resolve every component name and argument; errors name the file."""
    from torchkiln.config.build import check_components

    cfg = load_config(path, overrides)
    with config_errors_from(str(path) if path is not None else str(default_config_path())):
        check_components(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return dump_yaml_data(to_plain(cfg))
