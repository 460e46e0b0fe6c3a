"""ListNet on a generated learning-to-rank set: batches of whole queries against shuffled items.

    PYTHONPATH=src python benchmarks/ranking_batches.py [--epochs 15] [--out benchmarks/results/ranking_batches.md]

The data: `--queries` queries of 5-30 items, 20 features; relevance 0-3 from a fixed linear score
plus noise, in quartiles within the query. Written as a TensorFile (.npz with x, y, qid) and
trained through `kiln train` twice, `data.query_batches: false` (shuffled items) and `true` (whole
queries). Reported: the mean number of items per query in a training batch, the final train and
validation ListNet loss and the best validation NDCG@10. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def write_ltr_npz(path: Path, queries: int = 400, features: int = 20, seed: int = 0) -> Path:
    """A learning-to-rank set: x (float32), graded relevance y (int64, 0-3), query ids qid."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=features)
    xs, ys, qs = [], [], []
    for q in range(queries):
        n = int(rng.integers(5, 31))
        x = rng.normal(size=(n, features)) + rng.normal(size=features) * 0.5  # a per-query offset
        score = x @ w + rng.normal(scale=1.0, size=n)
        y = np.searchsorted(np.quantile(score, [0.5, 0.75, 0.9]), score)
        xs.append(x)
        ys.append(y)
        qs.append(np.full(n, q))
    np.savez(path, x=np.concatenate(xs).astype(np.float32), y=np.concatenate(ys).astype(np.int64),
             qid=np.concatenate(qs).astype(np.int64))  # sorted by query, as LETOR-style files are
    return path


def config(npz: Path, out: Path, query_batches: bool, epochs: int, batch_size: int) -> dict:
    return {
        "name": f"ltr-query-{str(query_batches).lower()}", "seed": 0, "output_dir": str(out), "task": "ranking",
        "data": {"dataset": {"type": "TensorFile", "args": {"path": str(npz)}}, "val_split": 0.25,
                 "batch_size": batch_size, "query_batches": query_batches},
        "model": {"type": "MLP", "args": {"in_features": 20, "num_classes": 1, "hidden": [32]}},
        "metrics": ["ndcg@10"],  # the ranking task's default loss: ListNetLoss
        "optimizer": {"type": "Adam", "args": {"lr": 0.003}},
        "trainer": {"epochs": epochs, "monitor": "val/ndcg@10"},
        "logging": {"progress": False, "tensorboard": False, "plots": False},
    }


def items_per_query(cfg_data: dict) -> float:
    """Mean over the first epoch's training batches of (items in the batch / queries in it)."""
    from torchkiln.config.build import build_data, build_loaders
    from torchkiln.config.load import resolve
    from torchkiln.data.loaders import set_loader_epoch

    cfg = resolve(cfg_data)
    loader = build_loaders(cfg, build_data(cfg))["train"]
    set_loader_epoch(loader, 0)
    ratios = [len(batch[2]) / len(np.unique(batch[2].numpy())) for batch in loader]
    return float(np.mean(ratios))


def run(cfg_data: dict) -> dict:
    from torchkiln.commands.train import train
    from torchkiln.config.load import resolve

    run_dir, summary = train(resolve(cfg_data), progress=False)
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"train/loss"' in line][-1]
    first = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"train/loss"' in line][0]
    return {"train_loss": last["train/loss"], "val_loss": last["val/loss"], "ndcg_1": first["val/ndcg@10"],
            "best_ndcg": summary["best"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        npz = write_ltr_npz(Path(tmp) / "ltr.npz", queries=args.queries)
        rows = []
        for qb in (False, True):
            cfg = config(npz, Path(tmp) / "runs", qb, args.epochs, args.batch_size)
            rows.append({"query_batches": qb, "items_per_query": items_per_query(cfg), **run(cfg)})
    lines = ["| data.query_batches | items per query per batch | train loss | val loss | val - train | val NDCG@10 after epoch 1 | best val NDCG@10 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {str(r['query_batches']).lower()} | {r['items_per_query']:.2f} | {r['train_loss']:.4f} |"
                     f" {r['val_loss']:.4f} | {r['val_loss'] - r['train_loss']:.4f} | {r['ndcg_1']:.4f} | {r['best_ndcg']:.4f} |")
    text = (f"ListNet, {args.queries} generated queries (5-30 items), batch_size {args.batch_size},"
            f" {args.epochs} epochs, seed 0\n\n" + "\n".join(lines) + "\n")
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
