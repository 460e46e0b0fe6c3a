"""`kiln train --folds`: one run per fold of `data.folds`, then the mean and spread of the monitored metric."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from torchkiln.config.schema import Config
from torchkiln.errors import ConfigError

log = logging.getLogger("torchkiln")


def train_folds(cfg: Config, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Runs land in `<output_dir>/<name>/folds-<time>/fold-<i>/`; `folds.json` holds the summary."""
    from torchkiln import run
    from torchkiln.config.build import check_components
    from torchkiln.engine import distributed

    k = cfg.data.folds
    if k is None:
        raise ConfigError("--folds: set data.folds (e.g. data.folds=5) to say how many folds to run")
    check_components(cfg)
    distributed.init_from_env(cfg.trainer.device, cfg.trainer.dist_timeout)
    rank0 = distributed.is_rank0()
    root = distributed.broadcast_object(_folds_root(cfg) if rank0 else None)  # rank duties: rank 0 makes it
    rows: list[dict[str, Any]] = []
    for fold in range(k):
        data = cfg.data.model_copy(update={"fold": fold})
        fold_cfg = cfg.model_copy(update={"data": data, "name": f"fold-{fold}", "output_dir": str(root)})
        log.info("fold %d of %d", fold + 1, k)
        run_dir, summary = run.train(fold_cfg, progress=progress)
        rows.append({"fold": fold, "run_dir": str(run_dir), "best": summary["best"],
                     "best_epoch": summary["best_epoch"]})
    values = [r["best"] for r in rows if r["best"] is not None]
    mean = sum(values) / len(values) if values else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    result = {"name": cfg.name, "folds": k, "monitor": summary["monitor"], "mean": mean, "std": std,
              "min": min(values, default=float("nan")), "max": max(values, default=float("nan")), "runs": rows}
    if rank0:
        (root / "folds.json").write_text(json.dumps(result, indent=2))
    return root, result


def _folds_root(cfg: Config) -> Path:
    base = Path(cfg.output_dir) / cfg.name / f"folds-{time.strftime('%Y%m%d-%H%M%S')}"
    root, i = base, 1
    while root.exists():
        root, i = base.with_name(f"{base.name}-{i}"), i + 1
    root.mkdir(parents=True)
    return root


def format_folds(result: dict[str, Any]) -> str:
    lines = [f"fold {r['fold']}  {result['monitor']} {r['best']:.6f}  (epoch {r['best_epoch']})  {r['run_dir']}"
             for r in result["runs"]]
    lines.append(f"{result['monitor']}: mean {result['mean']:.6f}, std {result['std']:.6f} (n-1),"
                 f" min {result['min']:.6f}, max {result['max']:.6f} over {result['folds']} folds")
    return "\n".join(lines)
