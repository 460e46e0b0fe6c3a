"""`kiln train --folds`: one run per fold of `data.folds`, then the mean and spread of the monitored metric."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

from torchkiln.commands import rank0
from torchkiln.commands.logs import console
from torchkiln.config.schema import Config
from torchkiln.errors import ConfigError
from torchkiln.rundir import FOLDS

log = logging.getLogger("torchkiln")


def main(args: argparse.Namespace) -> int:
    """Train every fold and print each one's best value, their mean and spread."""
    from torchkiln.config.load import load_config

    console(args.quiet)
    if args.resume:
        raise ConfigError("--folds and --resume exclude each other; resume a single fold's run instead")
    root, result = train_folds(load_config(args.config, args.overrides), progress=not args.quiet)
    print(format_folds(result))
    print(f"folds summary      {root / FOLDS}")
    return 0


def train_folds(cfg: Config, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Runs land in `<output_dir>/<name>/folds-<time>/fold-<i>/`; `folds.json` holds the summary."""
    from torchkiln.commands.train import train
    from torchkiln.config.build import check_components
    from torchkiln.engine import distributed

    k = cfg.data.folds
    if k is None:
        raise ConfigError("--folds: set data.folds (e.g. data.folds=5) to say how many folds to run")
    check_components(cfg)
    distributed.init_from_env(cfg.trainer.device, cfg.trainer.dist_timeout)
    root = rank0.folds_root(cfg)
    rows: list[dict[str, Any]] = []
    for fold in range(k):
        data = cfg.data.model_copy(update={"fold": fold})
        fold_cfg = cfg.model_copy(update={"data": data, "name": f"fold-{fold}", "output_dir": str(root)})
        log.info("fold %d of %d", fold + 1, k)
        run_dir, summary = train(fold_cfg, progress=progress)
        rows.append({"fold": fold, "run_dir": str(run_dir), "best": summary["best"],
                     "best_epoch": summary["best_epoch"]})
    values = [r["best"] for r in rows if r["best"] is not None]
    mean = sum(values) / len(values) if values else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    result = {"name": cfg.name, "folds": k, "monitor": summary["monitor"], "mean": mean, "std": std,
              "min": min(values, default=float("nan")), "max": max(values, default=float("nan")), "runs": rows}
    rank0.write_folds(root, result)
    return root, result


def format_folds(result: dict[str, Any]) -> str:
    lines = [f"fold {r['fold']}  {result['monitor']} {r['best']:.6f}  (epoch {r['best_epoch']})  {r['run_dir']}"
             for r in result["runs"]]
    lines.append(f"{result['monitor']}: mean {result['mean']:.6f}, std {result['std']:.6f} (n-1),"
                 f" min {result['min']:.6f}, max {result['max']:.6f} over {result['folds']} folds")
    return "\n".join(lines)
