"""Time from `kiln new` to the end of training, as a new user runs it: `kiln new NAME`, `pip install
-e .` (here into a folder of its own, without dependencies, so the environment is left as it was),
`kiln train -c configs/default.yaml`. Each step is a fresh process; the wall times are the result.

    python benchmarks/new_project.py --template classification --out benchmarks/results/new_project.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def run(template: str, home: Path) -> list[tuple[str, float, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    kiln = [sys.executable, "-m", "torchkiln"]
    steps = []
    seconds, _ = timed([*kiln, "new", "proj", "--template", template], home, env)
    steps.append(("kiln new proj", seconds, ""))
    project, site = home / "proj", home / "site"
    seconds, _ = timed([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-e", ".", "--target", str(site)], project, env)
    steps.append(("pip install -e .", seconds, ""))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(site), str(project / "src")])
    seconds, out = timed([*kiln, "train", "-c", "configs/default.yaml"], project, env)
    best = re.search(r"done: best (\S+ [\d.]+ at epoch \d+)", out)
    steps.append(("kiln train -c configs/default.yaml", seconds, best.group(1) if best else ""))
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--template", default="classification", choices=["classification", "multihead", "detection"])
    p.add_argument("--out", help="a Markdown file for the result table")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        steps = run(a.template, Path(tmp))
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import machine

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"# From `kiln new` to a trained model ({a.template} template)", "",
             f"{datetime.date.today()}, {machine()}, load average {load:.1f} at the end", "",
             "| step | wall s | result |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | {seconds:.1f} | {result} |" for name, seconds, result in steps]
    lines.append(f"| **total** | **{sum(s for _, s, _ in steps):.1f}** | |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
