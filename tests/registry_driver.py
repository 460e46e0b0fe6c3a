"""Run in a fresh process by test_registry_guard.py (never imported by the tests themselves).

`names`: import every module of the package, print every registry's names (what the package offers).
`cli NAMES_FILE CONFIGS_FILE`: run the CLI path once (`kiln config check` on the first config),
write the registries' names as that path sees them, then `kiln config check` each config in this
same process and write each one's exit code and message.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import sys
import traceback


def registry_names() -> dict[str, list[str]]:
    from torchkiln.data.transforms import transform_names
    from torchkiln.registry import Registry

    names = {r.kind: r.names() for r in gc.get_objects() if isinstance(r, Registry)}
    names["transform"] = transform_names()  # transform steps: torchvision's v2 names
    return names


def check(path: str) -> dict:
    from torchkiln.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["config", "check", "-c", path])
        except BaseException:  # noqa: BLE001 - reported to the test
            return {"code": "traceback", "error": traceback.format_exc()[-1500:]}
    return {"code": code, "error": err.getvalue().strip()[-600:]}


def main() -> None:
    if sys.argv[1] == "names":
        import importlib
        import pkgutil

        import torchkiln

        for mod in pkgutil.walk_packages(torchkiln.__path__, "torchkiln."):
            if not mod.name.endswith("__main__"):
                importlib.import_module(mod.name)
        print(json.dumps(registry_names()))
        return
    names_file, configs_file = sys.argv[2], sys.argv[3]
    configs = json.loads(open(configs_file).read())
    first = check(configs[0]["path"])  # the CLI path, first thing in this process
    with open(names_file, "w") as f:
        json.dump(registry_names(), f)
    results = [first] + [check(c["path"]) for c in configs[1:]]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
