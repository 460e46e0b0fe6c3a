"""`kiln config show|schema|check`: the resolved config, its JSON Schema, or everything a run
would build, described (nothing written)."""

from __future__ import annotations

import argparse
import json
import sys

from torchkiln.commands.logs import console


def main(args: argparse.Namespace) -> int:
    return {"show": show, "schema": schema, "check": check}[args.config_command](args)


def show(args: argparse.Namespace) -> int:
    """The resolved config as YAML, and nothing else (so it can be piped into a file)."""
    from torchkiln.config.load import dump_yaml, load_config

    sys.stdout.write(dump_yaml(load_config(args.config, args.overrides)))
    return 0


def schema(args: argparse.Namespace) -> int:
    from torchkiln.config.schema import Config

    print(json.dumps(Config.model_json_schema(), indent=2))
    return 0


def check(args: argparse.Namespace) -> int:
    """Build every part of the run as `kiln train` would and say what was built."""
    from torchkiln.commands import train
    from torchkiln.config.load import default_config_path, load_checked

    source = str(args.config or default_config_path())
    console(quiet=True)
    lines = train.check(load_checked(args.config, args.overrides), source)
    print(f"ok: {source}")
    print("\n".join("  " + line for line in lines))
    return 0
