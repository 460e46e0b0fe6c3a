"""`kiln test RUN_DIR`: a run's checkpoint evaluated on its test (or val) split; the metrics and the
per-class tables are written beside the run's other files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torchkiln.commands.logs import console
from torchkiln.config.load import apply_overrides, read_file, resolve
from torchkiln.errors import CheckpointError, ConfigError
from torchkiln.rundir import CONFIG, checkpoint_path, split_metrics, split_report


def main(args: argparse.Namespace) -> int:
    """Print the metrics, then the per-class report when the task writes one."""
    console(args.quiet)
    results = test(Path(args.run_dir), checkpoint=args.checkpoint, split=args.split, overrides=args.overrides,
                   tta=args.tta)
    width = max(len(k) for k in results) if results else 0
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.6f}")
    report = Path(args.run_dir) / split_report(args.split)
    if report.is_file():
        print()
        print(report.read_text(), end="")
    return 0


def test(run_dir: Path, checkpoint: str = "best", split: str = "test", overrides: list[str] | None = None,
         tta: str | None = None) -> dict[str, float]:
    """`tta` (flip, flip+crops): the metrics of the probabilities averaged over the views."""
    from torchkiln.commands.train import build_trainer, stored_normalization
    from torchkiln.engine.checkpoint import load_checkpoint, model_weights
    from torchkiln.inference.tta import make_tta

    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG})")
    cfg = resolve(apply_overrides(read_file(cfg_path), list(overrides or [])), str(cfg_path))
    ckpt = checkpoint_path(run_dir, checkpoint)
    state = load_checkpoint(ckpt)
    weights = model_weights(state, ckpt)
    stored = stored_normalization(state)
    if cfg.data.normalize is not None and stored is None:
        raise CheckpointError(f"{ckpt}: holds no data.normalize statistics (written before data.normalize"
                              " was set?); test with data.normalize=false or a checkpoint of this run")
    trainer, loaders = build_trainer(cfg, None, progress=False, pretrained=False, normalization=stored)
    if split not in loaders:
        raise ConfigError(
            f"{cfg_path}: this run has no {split} split (set data.{split}_split or data.{split}_dataset),"
            f" or use --split val"
        )
    try:
        trainer.load_weights(weights)
    except CheckpointError as exc:
        raise CheckpointError(f"{ckpt}: {exc}") from exc
    trainer.task.use_tta(make_tta(tta))
    results = trainer.evaluate(loaders[split], split)
    out = {"checkpoint": str(ckpt), "split": split, "samples": len(loaders[split].dataset),
           "tta": tta or "none", **results}
    (run_dir / split_metrics(split)).write_text(json.dumps(out, indent=2))
    _report(trainer, loaders[split], run_dir, split, results)
    return results


def _report(trainer, loader, run_dir: Path, split: str, results: dict[str, float]) -> None:
    """Per-class tables and confusion matrices (classification tasks), or the task's own table
    (detection: per-class AP), beside the metrics."""
    from torchkiln.data.wrappers import class_names_of
    from torchkiln.metrics.per_class import collect, write_reports

    (run_dir / split_report(split)).unlink(missing_ok=True)
    table = trainer.task.report_table(results, class_names_of(loader.dataset), split)
    if table is not None:
        (run_dir / split_report(split)).write_text(table)
        return
    outputs, targets = collect(trainer, loader)
    if outputs is not None:
        views = trainer.task.report_views(outputs, targets, class_names_of(loader.dataset))
        write_reports(views, run_dir, split)
