"""`kiln lr-find -c cfg.yaml [-o DIR] [--apply OUT.yaml]`: the LR range test (engine/lr_range.py) on
the run's own parts (built as `kiln train` builds them); the model, optimizer and RNG are put back.

Writes lr_find.png (the curve, both suggestions, the config's LR) and lr_find.json into DIR
(default `<output_dir>/<name>/lr_find`). `--apply OUT.yaml` writes the config with
`optimizer.args.lr` set to the suggestion (and `scheduler.args.max_lr` for OneCycleLR). The last
line printed is the suggested LR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torchkiln.commands.logs import console

PNG, JSON = "lr_find.png", "lr_find.json"


def main(args: argparse.Namespace) -> int:
    console(quiet=True)
    lr_find(args.config, list(args.overrides), args.out, args.apply, args.start, args.end, args.steps)
    return 0


def config_lr(data: dict[str, Any]) -> tuple[float | None, str]:
    """The LR a config trains with, and where it is: OneCycleLR's max_lr, else optimizer.args.lr."""
    sched = data.get("scheduler") or {}
    if sched.get("type") == "OneCycleLR" and (sched.get("args") or {}).get("max_lr") is not None:
        return float(sched["args"]["max_lr"]), "scheduler.args.max_lr (OneCycleLR)"
    lr = ((data.get("optimizer") or {}).get("args") or {}).get("lr")
    return (float(lr) if lr is not None else None), "optimizer.args.lr"


def lr_find(config: str | None, overrides: list[str], out: str | None = None, apply: str | None = None,
            start: float = 1e-7, end: float = 10.0, steps: int = 100) -> float:
    from torchkiln.commands.train import build_parts
    from torchkiln.config.load import (
        apply_overrides,
        config_errors_from,
        default_config_path,
        load_checked,
        read_file,
    )
    from torchkiln.engine.lr_range import check_range, range_test
    from torchkiln.errors import flag_errors

    with flag_errors({"start/end": "--start/--end", "steps": "--steps"}):
        check_range(start, end, steps)
    path = Path(config) if config else default_config_path()
    cfg = load_checked(path, overrides)
    data = apply_overrides(read_file(path), overrides)
    with config_errors_from(str(path)):
        trainer, loaders, _ = build_parts(cfg, progress=False)
        result = range_test(trainer, loaders["train"], start=start, end=end, steps=steps)
    folder = Path(out) if out else Path(cfg.output_dir) / cfg.name / "lr_find"
    folder.mkdir(parents=True, exist_ok=True)
    current, where = config_lr(data)
    plot(result, folder / PNG, current)
    (folder / JSON).write_text(json.dumps({**result.to_dict(), "config_lr": current, "config_lr_key": where},
                                          indent=2) + "\n")
    lr = result.suggestion
    print(f"lr-find: {len(result.lrs)} steps, LR {start:.1e} to {end:.1e}; {result.stop}")
    print(f"  valley (fastai)   {lr:.2e}   <- suggested")
    if result.steepest is not None:
        print(f"  steepest descent  {result.lrs[result.steepest]:.2e}")
    print(f"  the config's LR   {current:.2e} ({where})" if current is not None else "  the config's LR   none")
    print(f"wrote {folder / PNG}, {folder / JSON}")
    if apply:
        print(f"wrote {write_applied(data, lr, Path(apply))} with the LR set")
    print(f"{lr:.3g}")
    return lr


def write_applied(data: dict[str, Any], lr: float, out: Path) -> Path:
    """The config (as loaded, with its overrides) with the suggested LR set, checked before it is written."""
    from torchkiln.config.load import resolve
    from torchkiln.config.yamlio import dump_yaml_data

    value = float(f"{lr:.3g}")
    data.setdefault("optimizer", {}).setdefault("args", {})["lr"] = value
    sched = data.get("scheduler") or {}
    if sched.get("type") == "OneCycleLR":
        sched.setdefault("args", {})["max_lr"] = value
    resolve(data, str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_yaml_data(data))
    return out


def plot(result: Any, path: Any, config_lr: float | None = None) -> None:
    """lr_find.png: the loss and its smoothing against the LR, the two suggestions and the config's LR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.losses, color="tab:blue", alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", label="smoothed loss")
    for idx, color, name in ((result.valley, "tab:red", "valley (suggested)"),
                             (result.steepest, "tab:green", "steepest descent")):
        if idx is not None:
            ax.scatter([result.lrs[idx]], [result.smoothed[idx]], color=color, zorder=3, s=50,
                       label=f"{name}: {result.lrs[idx]:.2e}")
    if config_lr is not None:
        ax.axvline(config_lr, color="gray", linestyle="--", label=f"config's LR: {config_lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    if result.smoothed:
        low, high = min(result.smoothed), result.smoothed[0]
        ax.set_ylim(low - 0.1 * abs(high - low), max(high, low) + 0.5 * abs(high - low) + 1e-9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
