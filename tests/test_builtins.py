"""registry.BUILTIN_MODULES is the one list of torchkiln's own registrations."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torchkiln
from torchkiln.registry import BUILTIN_MODULES

# A module-level registration: `@REG.register`, `REG.register(...)`, `REG.register_scheme(...)`,
# or metrics' `_register(...)`.
REGISTERS = re.compile(r"^\s*(@[A-Z_]+\.register\b|[A-Z_]+\.register(_scheme)?\(|_register\()", re.M)


def test_every_registering_module_is_listed_once():
    root = Path(torchkiln.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        if REGISTERS.search(path.read_text()):
            parts = path.relative_to(root.parent).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert found == set(BUILTIN_MODULES)
    assert len(BUILTIN_MODULES) == len(set(BUILTIN_MODULES))


def test_load_builtins_alone_registers_the_backbone_schemes():
    """No other import is needed: `timm:` and `torchvision:` names resolve after load_builtins()."""
    code = ("from torchkiln.registry import MODELS, load_builtins\n"
            "assert 'torchkiln.models' not in __import__('sys').modules\n"
            "load_builtins()\n"
            "print(sorted(MODELS._schemes), 'SmallCNN' in MODELS.names())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["['timm',", "'torchvision']", "True"]
