"""torchkiln's metric base and MetricSet (metrics/base.py): over two ranks the same values as one
process over all samples, local states untouched by a compute, a checkpoint round trip, a
torchmetrics metric held beside torchkiln's, and no torchmetrics import for the default metrics."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from ranks import free_port, two_ranks
from torchkiln.metrics import build_metrics
from torchkiln.tasks.base import ClassificationTask, RegressionTask
from torchkiln.tasks.ranking import RankingTask

CLASS_SPECS = ["accuracy", "f1_macro", "precision_per_class", "top2_accuracy", "balanced_accuracy"]


def _samples(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (70,), generator=g)
    logits = torch.randn(70, 5, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 5)
    yr = torch.randn(70, 2, generator=g) * 3 + 100
    pr = yr + torch.randn(70, 2, generator=g)
    scores, rel, query = torch.randn(70, generator=g), torch.randint(0, 3, (70,), generator=g), torch.arange(70) // 7
    return logits, y, pr, yr, scores, rel, query


def _values(rank: int | None, world: int = 1) -> dict[str, float]:
    """Every default metric family over the samples (rank r of `world` gets an uneven share; rank 1
    no ranking samples at all); `rank=None`: one process over all of them."""
    logits, y, pr, yr, scores, rel, query = _samples()
    cut = 48  # rank 0: the first 48 samples, rank 1: the other 22
    part = slice(None) if rank is None else (slice(0, cut) if rank == 0 else slice(cut, None))
    cls, reg, rnk = ClassificationTask(), RegressionTask(targets=2), RankingTask()
    sets = {"c": cls.build_metrics(CLASS_SPECS, 5), "r": reg.build_metrics(["mae", "mse", "rmse", "r2"], 2),
            "k": rnk.build_metrics(["ndcg@5", "mrr"], None)}
    cls.update_metrics(sets["c"], logits[part], y[part])
    reg.update_metrics(sets["r"], pr[part], yr[part])
    if rank in (None, 0):
        rnk.update_metrics(sets["k"], scores, (rel, query))  # whole queries: all on rank 0
    before = {k: {n: v.clone() if isinstance(v, torch.Tensor) else list(v) for n, v in m.state_dict().items()}
              for s in sets.values() for k, m in s.items()}
    out: dict[str, float] = {}
    for s in sets.values():
        for k, v in s.compute().items():
            out.update({f"{k}/{i}": float(x) for i, x in enumerate(v.reshape(-1))} if v.numel() > 1 else {k: float(v)})
    after = {k: m.state_dict() for s in sets.values() for k, m in s.items()}
    for k, states in before.items():  # a compute over the ranks leaves each rank's own state as it was
        for n, v in states.items():
            assert torch.equal(v, after[k][n]), (k, n)
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_values(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_compute_what_one_process_computes_over_all_samples(tmp_path):
    two_ranks(_worker, free_port(), str(tmp_path))
    one = _values(None)
    assert {"accuracy", "f1_macro", "top2_accuracy", "mae", "r2", "ndcg@5", "mrr"} <= set(one)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == one.keys()
        for k, v in one.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (rank, k)


def test_state_dict_round_trip_and_a_torchmetrics_member():
    """A mid-epoch checkpoint's metric states load into a fresh set and give the same values; a
    torchmetrics metric (a user's, or a name with torchmetrics' arguments) sits beside torchkiln's."""
    logits, y, *_ = _samples(1)
    task = ClassificationTask()
    specs = ["accuracy", {"type": "f1_macro", "args": {"ignore_index": 3}}, "top3_accuracy",
             {"type": "torchmetrics.classification:MulticlassAccuracy", "args": {"num_classes": 5, "average": "micro"}}]
    first = task.build_metrics(specs, 5).clone(prefix="val/")
    task.update_metrics(first, logits[:40], y[:40])
    saved = first.state_dict()
    second = task.build_metrics(specs, 5).clone(prefix="val/")
    second.load_state_dict(saved)
    for part in (first, second):
        task.update_metrics(part, logits[40:], y[40:])
    a, b = first.compute(), second.compute()
    assert list(a) == ["val/accuracy", "val/f1_macro", "val/top3_accuracy", "val/MulticlassAccuracy"]
    for k in a:
        assert float(a[k]) == pytest.approx(float(b[k]))
    assert float(a["val/accuracy"]) == pytest.approx(float(a["val/MulticlassAccuracy"]))
    with pytest.raises(ValueError, match="saved metrics"):
        build_metrics(["accuracy"], 5).load_state_dict(saved)


def test_default_metrics_do_not_import_torchmetrics():
    """The metrics of a default classification, regression and ranking run are torchkiln's: building
    and computing them never imports torchmetrics (about 4 s of start-up); AUROC does."""
    code = ("import sys, torch\n"
            "from torchkiln.metrics import build_metrics\n"
            "m = build_metrics(['accuracy', 'f1_macro', 'top2_accuracy', 'balanced_accuracy'], 3)\n"
            "m.update(torch.tensor([[2.0, 0, 0], [0, 1, 0]]), torch.tensor([0, 2])); m.compute()\n"
            "build_metrics(['rmse', 'mae', 'mse', 'r2'], 1, kind='regression').compute()\n"
            "build_metrics(['ndcg@3', 'map'], None, kind='ranking')\n"
            "assert 'torchmetrics' not in sys.modules, 'imported by the default metrics'\n"
            "build_metrics(['auroc'], 3)\n"
            "assert 'torchmetrics' in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
