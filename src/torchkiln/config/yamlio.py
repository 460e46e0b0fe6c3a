"""YAML the way configs are read and written: safe tags only, YAML 1.2 floats, no duplicate keys.

PyYAML resolves plain scalars by YAML 1.1, where a float needs a dot and a signed exponent: `1e-3`
and `1.0e12` are strings there, and a learning rate in an `args:` mapping (which no schema field
converts) reaches the optimizer as text. YAML 1.2's core schema reads them as floats; so do we.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from torchkiln.errors import ConfigError

# YAML 1.2 core-schema floats written as numbers: an optional sign, digits with a dot or an exponent
# (or both). The lookahead leaves integers (`12`) to the int resolver.
FLOAT_12 = re.compile(r"^(?=.*[.eE])[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
FLOAT_TAG = "tag:yaml.org,2002:float"
MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(ConfigError):
    """A mapping names one key twice (YAML would silently keep the last); the message has no file."""

    def __init__(self, key_path: str, line: int, column: int, first_line: int):
        self.key_path, self.line, self.column, self.first_line = key_path, line, column, first_line
        super().__init__(f"line {line}, column {column}: duplicate key '{key_path}' (first given on line"
                         f" {first_line}); keep one of them")


class ConfigLoader(yaml.SafeLoader):
    """safe_load's loader, reading YAML 1.2 floats and refusing a key given twice in one mapping."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self.key_paths: dict[int, str] = {}  # id(node) -> its dotted key path, for the messages

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicates(node)  # before merge keys (`<<`) are flattened in: those may be overridden
        return super().construct_mapping(node, deep=deep)

    def construct_sequence(self, node: yaml.Node, deep: bool = False) -> list[Any]:
        where = self.key_paths.get(id(node), "")
        for i, item in enumerate(node.value):
            self.key_paths.setdefault(id(item), f"{where}.{i}" if where else str(i))
        return super().construct_sequence(node, deep=deep)

    def _refuse_duplicates(self, node: yaml.MappingNode) -> None:
        where = self.key_paths.get(id(node), "")
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class refuses an unhashable key with its own message
            path = f"{where}.{key}" if where else str(key)
            self.key_paths.setdefault(id(value_node), path)
            mark = key_node.start_mark
            if key in first_line:
                raise DuplicateKeyError(path, mark.line + 1, mark.column + 1, first_line[key])
            first_line[key] = mark.line + 1


class ConfigDumper(yaml.SafeDumper):
    """safe_dump's dumper; a string that ConfigLoader would read as a float (`'1e-3'`) is quoted."""


ConfigLoader.add_implicit_resolver(FLOAT_TAG, FLOAT_12, list("-+.0123456789"))
ConfigDumper.add_implicit_resolver(FLOAT_TAG, FLOAT_12, list("-+.0123456789"))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader subclass: plain data only


def dump_yaml_data(data: Any) -> str:
    return yaml.dump(data, Dumper=ConfigDumper, sort_keys=False, default_flow_style=None)
