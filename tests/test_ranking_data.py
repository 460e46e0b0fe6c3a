"""Ranking data: splits by query, whole-query batches (shuffled, resumable, split across ranks by
query), query ids in TensorFile, and ListNet trained through `kiln` on a generated set."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, kiln, small_config, write_config
from torchkiln.commands.train import build_trainer
from torchkiln.config.build import build_data, build_loaders
from torchkiln.config.load import resolve
from torchkiln.data.groups import dataset_groups
from torchkiln.data.loaders import set_loader_epoch
from torchkiln.data.query_sampler import QueryBatchSampler, queries_per_batch
from torchkiln.data.splits import split_dataset
from torchkiln.data.tensorfile import TensorFile
from torchkiln.errors import ConfigError, DataError


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ranking_batches", ROOT / "benchmarks" / "ranking_batches.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ltr(tmp_path_factory) -> Path:
    """A generated learning-to-rank set (x, graded y, qid), queries of 5-30 items."""
    return _bench().write_ltr_npz(tmp_path_factory.mktemp("ltr") / "ltr.npz", queries=120)


def _groups(sizes: list[int], seed: int = 0) -> np.ndarray:
    """Query ids for queries of the given sizes, their items interleaved in the data set."""
    ids = np.concatenate([np.full(n, 100 + q) for q, n in enumerate(sizes)])
    return ids[np.random.default_rng(seed).permutation(len(ids))]


def _ranking_cfg(tmp_path, npz: Path, **data) -> dict:
    return small_config(tmp_path, task="ranking", metrics=["ndcg@10"],
                        data={"dataset": {"type": "TensorFile", "args": {"path": str(npz)}}, "val_split": 0.25,
                              "test_split": 0.0, "batch_size": 64, **data},
                        model={"type": "MLP", "args": {"in_features": 20, "num_classes": 1, "hidden": [16]}},
                        trainer={"epochs": 2, "monitor": "val/ndcg@10", "device": "cpu"},
                        logging={"progress": False, "tensorboard": False, "plots": False})


# -- TensorFile carries query ids ----------------------------------------------------------------
def test_tensor_file_reads_query_ids_and_gives_three_part_samples(tmp_path, ltr):
    ds = TensorFile(str(ltr))
    qid = np.load(ltr)["qid"]
    assert np.array_equal(dataset_groups(ds), qid)
    x, y, q = ds[3]
    assert x.shape == (20,) and int(q) == qid[3]
    assert len(ds.fast_tensors()) == 3
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int64), qid=np.zeros((4, 2)))
    with pytest.raises(DataError, match="'qid' must hold one integer query id per row"):
        TensorFile(str(tmp_path / "bad.npz"))
    with pytest.raises(DataError, match="no array 'query'"):
        TensorFile(str(ltr), group_key="query")
    assert dataset_groups(TensorFile(str(ltr), group_key=None)) is None


# -- splits ------------------------------------------------------------------------------------
@pytest.mark.parametrize("folds", [None, 4])
def test_splits_keep_every_query_in_one_part_and_count_queries(ltr, folds):
    ds = TensorFile(str(ltr))
    qid = np.load(ltr)["qid"]
    train, val, test = split_dataset(ds, 0.25, 0.2, seed=0, folds=folds, fold=1)
    parts = [set(qid[p.indices]) for p in (train, val, test)]
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert set().union(*parts) == set(qid)
    assert sum(len(p) for p in (train, val, test)) == len(ds)
    if folds is None:
        assert len(parts[2]) == round(0.2 * 120) and len(parts[1]) == round(0.25 * 120)


# -- the query-grouped batch sampler -----------------------------------------------------------
def _batches(sampler, epoch: int, skip: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    sampler.skip(skip)
    return [list(b) for b in sampler]


def test_query_batches_hold_whole_queries_shuffled_by_query_and_deterministic():
    sizes = [3, 7, 1, 12, 5, 5, 9, 2, 4, 6, 8, 10]
    groups = _groups(sizes)
    per = queries_per_batch(groups, 12)
    assert per == round(12 * len(sizes) / len(groups))
    sampler = QueryBatchSampler(groups, per, shuffle=True, seed=3)
    e0, e1 = _batches(sampler, 0), _batches(sampler, 1)
    assert len(e0) == len(sampler) == -(-len(sizes) // per)
    for epoch in (e0, e1):
        items = [i for b in epoch for i in b]
        assert sorted(items) == list(range(len(groups)))  # every item once
        for b in epoch:
            for q in set(groups[b]):  # each query in the batch is whole
                assert (groups[b] == q).sum() == (groups == q).sum()
    order = [[groups[b[0]] for b in e] for e in (e0, e1)]
    assert order[0] != order[1]  # a new order of queries each epoch
    assert _batches(QueryBatchSampler(groups, per, shuffle=True, seed=3), 1) == e1  # (seed, epoch) alone
    assert _batches(sampler, 1, skip=2) == e1[2:]  # mid-epoch resume: the remaining batches
    plain = _batches(QueryBatchSampler(groups, per, shuffle=False, seed=3), 0)
    first_seen = list(dict.fromkeys(groups.tolist()))
    assert [q for b in plain for q in dict.fromkeys(groups[b].tolist())] == first_seen


def test_under_ddp_each_rank_takes_whole_queries():
    groups = _groups([4, 2, 6, 3, 5, 1, 7, 2, 3])  # 9 queries over 2 ranks
    world = 2
    train = [QueryBatchSampler(groups, 2, shuffle=True, seed=0, rank=r, world_size=world) for r in range(world)]
    per_rank = [_batches(s, 4) for s in train]
    assert len(per_rank[0]) == len(per_rank[1]) == len(train[0]) == len(train[1])  # no rank waits
    queries = [{int(groups[i]) for b in batches for i in b} for batches in per_rank]
    assert queries[0] | queries[1] == set(groups.tolist())
    assert len(queries[0] & queries[1]) <= 1  # one query repeated as padding (9 queries, 2 ranks)
    evaluation = [QueryBatchSampler(groups, 2, shuffle=False, seed=0, rank=r, world_size=world, pad=False)
                  for r in range(world)]
    seen = [i for s in evaluation for b in _batches(s, 0) for i in b]
    assert sorted(seen) == list(range(len(groups)))  # evaluation: every item exactly once
    for s in evaluation:
        for b in _batches(s, 0):
            for q in set(groups[b]):
                assert (groups[b] == q).sum() == (groups == q).sum()


def test_ranking_loaders_batch_whole_queries_automatically(tmp_path, ltr):
    qid = np.load(ltr)["qid"]
    _, counts = np.unique(qid, return_counts=True)
    for setting, whole in (("auto", True), (False, False)):
        cfg = resolve(_ranking_cfg(tmp_path, ltr, query_batches=setting))
        loaders = build_loaders(cfg, build_data(cfg))
        for split in ("train", "val"):
            set_loader_epoch(loaders[split], 0)
            batches = list(loaders[split])
            complete = all(int((b[2] == q).sum()) == counts[q] for b in batches for q in b[2].unique().tolist())
            assert complete is whole, (setting, split)
        if whole:
            items = np.mean([len(b[2]) for b in batches])
            assert 0.6 * 64 < items < 1.6 * 64  # batch_size: about that many items


def test_query_batches_refused_where_they_cannot_work(tmp_path, ltr):
    cfg = resolve(small_config(tmp_path, data={"query_batches": True}))
    with pytest.raises(ConfigError, match="data.query_batches: true needs query ids"):
        build_loaders(cfg, build_data(cfg))
    cfg = resolve(_ranking_cfg(tmp_path, ltr, sampler="balanced"))
    with pytest.raises(ConfigError, match="balanced and whole-query batches"):
        build_loaders(cfg, build_data(cfg))


def test_whole_query_batches_resume_mid_epoch_to_the_same_weights(tmp_path, ltr):
    raw = _ranking_cfg(tmp_path, ltr)
    raw["trainer"]["checkpoint_every_steps"] = 3
    cfg = resolve(raw)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    full, loaders = build_trainer(cfg, run_dir, progress=False)
    assert isinstance(loaders["train"].batch_sampler, QueryBatchSampler)
    assert len(loaders["train"]) > 3
    full.fit(loaders["train"], loaders["val"])
    resumed, loaders = build_trainer(cfg, None, progress=False)
    resumed.fit(loaders["train"], loaders["val"], resume=run_dir / "checkpoints" / "step-000003.ckpt")
    a, b = full.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- ListNet through kiln --------------------------------------------------------------------
def _last_losses(run_root: Path) -> tuple[float, float]:
    metrics = next(run_root.glob("*/*/metrics.csv"))
    row = list(csv.DictReader(metrics.open()))[-1]
    return float(row["train/loss"]), float(row["val/loss"])


def test_listnet_through_kiln_trains_on_whole_queries(tmp_path, ltr):
    gaps = {}
    for setting in ("auto", "false"):
        raw = _ranking_cfg(tmp_path / setting, ltr)
        raw["trainer"]["epochs"] = 4
        cfg = write_config(tmp_path, raw, f"{setting}.yaml")
        kiln("train", "-c", str(cfg), f"data.query_batches={setting}", check=True)
        train_loss, val_loss = _last_losses(tmp_path / setting / "runs")
        gaps[setting] = val_loss - train_loss
    # Shuffled items leave ~1 item per query in a batch: a near-zero train loss against a large
    # validation loss. Whole queries: the two losses measure the same thing.
    assert gaps["false"] > 1.0
    assert abs(gaps["auto"]) < 0.3


def test_benchmark_script_reports_items_per_query(tmp_path):
    out = tmp_path / "ranking.md"
    assert _bench().main(["--epochs", "1", "--queries", "60", "--out", str(out)]) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| false")
            or line.startswith("| true")]
    per_query = {r[0].strip(): float(r[1]) for r in rows}
    assert per_query["false"] < 2.0 < 10.0 < per_query["true"]


def test_ranking_data_without_query_ids_is_split_by_item_with_a_warning(tmp_path, ltr, caplog):
    cfg = resolve(_ranking_cfg(tmp_path, ltr, dataset={"type": "TensorFile",
                                                       "args": {"path": str(ltr), "group_key": None}}))
    with caplog.at_level("WARNING", logger="torchkiln"):
        data = build_data(cfg)
    assert "exposes no query ids" in caplog.text
    assert build_loaders(cfg, data)["train"].batch_sampler.__class__ is not QueryBatchSampler
    caplog.clear()
    with caplog.at_level("WARNING", logger="torchkiln"):
        build_data(resolve(_ranking_cfg(tmp_path, ltr)))
    assert "exposes no query ids" not in caplog.text


def test_two_processes_train_on_whole_queries_without_waiting_on_each_other(tmp_path, ltr):
    raw = _ranking_cfg(tmp_path, ltr, val_split=0.3)  # 84 training queries, 36 for validation
    cfg = write_config(tmp_path, raw)
    proc = kiln("train", "-c", str(cfg), "--devices", "2", "trainer.dist_timeout=60", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_loss, val_loss = _last_losses(tmp_path / "runs")
    assert abs(val_loss - train_loss) < 0.5
