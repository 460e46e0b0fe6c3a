"""Config: load YAML/JSON, apply dotted overrides, validate, build objects."""

from torchkiln.config.load import DEFAULT_CONFIG, load_config, resolve
from torchkiln.config.schema import Config

__all__ = ["Config", "DEFAULT_CONFIG", "load_config", "resolve"]
