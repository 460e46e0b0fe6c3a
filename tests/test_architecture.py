"""The shape of the package, measured from its source: layers point one way, no import cycles,
the Trainer takes built parts, and functions stay short enough to read (docs/architecture.md)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "src" / "torchkiln"
# layer -> what it must not import (a module path prefix below torchkiln)
FORBIDDEN = {
    "engine": ("config", "commands", "cli"),
    "callbacks": ("config", "commands", "cli"),
    "data": ("engine.trainer", "config", "commands", "cli"),
    "models": ("engine.trainer", "config", "commands", "cli"),
    "tasks": ("engine.trainer", "config", "commands", "cli"),
    "loggers": ("config", "commands", "cli"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every torchkiln module `name` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known and c != name)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (imports for annotations only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_point_one_way():
    wrong = []
    for module, targets in _graph().items():
        layer = module.split(".")[1] if "." in module else ""
        for target in targets:
            below = target.split(".", 1)[1] if "." in target else ""
            if any(below == f or below.startswith(f + ".") for f in FORBIDDEN.get(layer, ())):
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_trainer_is_short_and_takes_parts():
    from torchkiln.engine.trainer import Trainer

    trainer = PKG / "engine" / "trainer.py"
    assert len(trainer.read_text().splitlines()) <= 450
    assert max(n for _, n in _functions(trainer)) <= 60
    params = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    assert len(params) <= 16, params


def test_no_function_in_the_package_is_over_90_lines():
    long = [f"{path.relative_to(PKG)}:{name} ({n})" for path in PKG.rglob("*.py")
            for name, n in _functions(path) if n > 90]
    assert not long, long
