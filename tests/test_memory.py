"""Out of memory on a CPU, injected: a model that raises torch.OutOfMemoryError above a batch of 24.

The batch-size finder (power, binsearch, the bound, restored state), recovery by micro-batches
(the same gradient, one optimizer step, counted, the failed step's tensors freed), the stop with
last.ckpt, two Gloo processes where one rank runs out, the leak watch, activation checkpointing,
and `kiln doctor`.
"""

from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import kiln, small_config, write_config
from torchkiln import Callback, make_trainer
from torchkiln.engine.batch_finder import Trial, find_batch_size, search
from torchkiln.engine.checkpoint import load_checkpoint
from torchkiln.engine.memory import SavedActivations, checkpoint_modules
from torchkiln.engine.oom import OOMRecovery, OutOfMemoryStop, slice_batch
from torchkiln.errors import SettingError

LIMIT = 24
FREED: list[weakref.ref] = []  # weakrefs to tensors of failed steps


def _oom(n: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} MiB (injected)")


class _RaiseInBackward(torch.autograd.Function):
    """Identity whose backward runs out of memory above the limit (gradients behind it are already accumulated)."""

    @staticmethod
    def forward(ctx, x, limit):
        ctx.limit = limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.shape[0] > ctx.limit:
            raise _oom(grad.shape[0])
        return grad, None


class OOMAbove(nn.Module):
    """An MLP that runs out of memory above `limit` samples, in forward or in backward (`where`);
    `rank`: only that rank runs out (None: every process)."""

    def __init__(self, limit: int = LIMIT, where: str = "forward", rank: int | None = None):
        super().__init__()
        self.limit, self.where, self.rank = limit, where, rank
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
        self.head = nn.Linear(16, 10)

    def _limited(self) -> bool:
        import torch.distributed as dist

        return self.rank is None or (dist.is_initialized() and dist.get_rank() == self.rank)

    def forward(self, x):
        h = self.body(x)
        if self._limited() and x.shape[0] > self.limit:
            if self.where == "forward":
                FREED.append(weakref.ref(h))
                raise _oom(x.shape[0])
            h = _RaiseInBackward.apply(h, self.limit)
        return self.head(h)


def _data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


class _Grads(Callback):
    """The gradients the optimizer steps with, and the number of steps."""

    def __init__(self):
        self.grads: list[list[torch.Tensor]] = []

    def on_fit_start(self, trainer):
        trainer.optimizer.register_step_pre_hook(
            lambda opt, *_: self.grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))


class _FreedCheck(Callback):
    """After each micro-batch: are the failed steps' tensors gone?"""

    def __init__(self):
        self.alive_after_batch: list[int] = []

    def on_train_batch_end(self, trainer, batch, samples):
        self.alive_after_batch.append(sum(r() is not None for r in FREED))


def _train(model: nn.Module, loader, **kw):
    grads, freed = _Grads(), _FreedCheck()
    torch.manual_seed(0)
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, progress=False,
                           device="cpu", train_metrics=False, callbacks=[grads, freed], **kw)
    return trainer, trainer.fit(loader), grads, freed


def _model(seed: int = 0, **kw) -> OOMAbove:
    torch.manual_seed(seed)
    return OOMAbove(**kw)


# ------------------------------------------------------------------------------------------
# the finder
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, largest, answer", [("power", 16, 14), ("binsearch", 24, 21)])
def test_search_doubles_then_bisects_and_keeps_a_margin(mode, largest, answer):
    tried = []

    def fits(size):
        tried.append(size)
        return Trial(size, size <= LIMIT, 1)

    result = search(fits, mode, start=2, max_size=4096)
    assert (result.largest, result.size) == (largest, answer)
    assert tried[:5] == [2, 4, 8, 16, 32]
    assert tried[5:] == ([] if mode == "power" else [24, 28, 26, 25])
    assert search(lambda s: Trial(s, s <= LIMIT, 1), mode, margin=0).size == largest


def test_search_stops_at_its_bound_and_says_so():
    result = search(lambda s: Trial(s, True, 1), "binsearch", start=2, max_size=100, bound_reason="the data (100)")
    assert result.size == 100 and result.bound == "the data (100)"
    assert "nothing ran out of memory up to 100, the data (100)" in result.lines()[-1]


def test_finder_runs_real_steps_and_restores_the_model_and_optimizer():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    trainer = make_trainer(model, opt, progress=False, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    x, y = _data(200).tensors
    result = find_batch_size(trainer, lambda n: (x[:n], y[:n]), samples=200, mode="binsearch", margin=0)
    assert result.size == LIMIT
    assert [t.size for t in result.trials if not t.fits] == [32, 28, 26, 25]
    assert all(t.peak > 0 for t in result.trials if t.fits)  # each try's memory, measured
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opt.state and all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.random.get_rng_state())


# ------------------------------------------------------------------------------------------
# recovery
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where, accumulate", [("forward", 1), ("backward", 2)])
def test_split_gives_the_unsplit_gradient_in_one_step_and_frees_the_failed_step(where, accumulate, caplog):
    FREED.clear()
    loader = DataLoader(_data(64), batch_size=32)
    _, ref, ref_grads, _ = _train(_model(limit=10**6), loader, accumulate=accumulate)
    with caplog.at_level(logging.WARNING, logger="torchkiln"):
        trainer, summary, grads, freed = _train(_model(where=where), loader, accumulate=accumulate, on_oom="split")
    steps = 2 // accumulate
    assert len(grads.grads) == len(ref_grads.grads) == steps  # one optimizer step per group, as unsplit
    for got, want in zip(grads.grads, ref_grads.grads):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert summary["oom_recoveries"] == 2 and summary["global_step"] == steps
    assert summary["final"]["train/loss"] == pytest.approx(ref["final"]["train/loss"], rel=1e-5)
    logged = [r.getMessage() for r in caplog.records if "recovered as 2 micro-batches" in r.getMessage()]
    assert len(logged) == 2 and "(recoveries so far: 2)" in logged[-1]
    if where == "forward":
        assert len(FREED) == 2 and freed.alive_after_batch == [0, 0]  # gone before the loop went on


def test_stop_writes_last_ckpt_from_the_state_before_the_step(tmp_path, caplog):
    data = _data(64)
    loader = DataLoader(data, batch_sampler=[list(range(0, 16)), list(range(16, 32)), list(range(32, 64))])
    torch.manual_seed(0)
    model = _model()
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, progress=False,
                           device="cpu", train_metrics=False, run_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="torchkiln"), pytest.raises(OutOfMemoryStop) as err:
        trainer.fit(loader)
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("memory estimate (32): parameters 4.7 KB + gradients 4.7 KB") for m in logged)
    assert any(m.startswith("  using it: parameters 4.7 KB") and "for 32 samples" in m for m in logged)
    assert "  - data.batch_size=16 trainer.accumulate=2 (a batch that fits, half of it; the effective batch stays 32," \
        " or more)" in logged
    text = str(err.value)
    assert "out of memory at epoch 1, batch 3 (32 samples)" in text
    assert "data.batch_size=16 trainer.accumulate=2" in text and "trainer.on_oom=split" in text
    assert "last.ckpt holds the state before this step" in text and "\n" not in text
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert state["loop"]["global_step"] == 2 and state["loop"]["batch_in_epoch"] == 2
    assert state["epoch_accum"]["count"] == 32  # the two batches before it, not the failed one
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state["model"].items())


def test_split_gives_up_past_its_bound_with_a_clear_line():
    loader = DataLoader(_data(32), batch_size=32)
    with pytest.raises(OutOfMemoryStop, match=r"32 samples and as 2 micro-batches"):
        _train(_model(limit=8), loader, on_oom=OOMRecovery("split", max_pieces=2))


def test_slice_batch_cuts_tensors_lists_and_dicts_of_the_batch():
    batch = {"input": torch.arange(6), "meta": ["a", "b", "c", "d", "e", "f"], "scale": torch.tensor(2.0)}
    part = slice_batch(batch, 2, 4, 6)
    assert part["input"].tolist() == [2, 3] and part["meta"] == ["c", "d"] and part["scale"].item() == 2.0
    x, y = slice_batch((torch.zeros(6, 3), torch.arange(6)), 0, 3, 6)
    assert x.shape == (3, 3) and y.tolist() == [0, 1, 2]


def test_on_oom_is_checked():
    with pytest.raises(SettingError, match="on_oom: expected stop or split"):
        OOMRecovery("retry")


# ------------------------------------------------------------------------------------------
# two Gloo processes: only rank 1 runs out
# ------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, out: str) -> None:
    import datetime

    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    dist.init_process_group("gloo", init_method=f"file://{Path(out, 'rendezvous')}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    data = _data(128, seed=rank)
    loader = DataLoader(data, batch_size=32, sampler=DistributedSampler(data, world, rank, shuffle=False))
    model = _model(rank=1)  # only rank 1 runs out above 24; rank 0 would take all 64 of its samples
    finder = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), progress=False, device="cpu")
    x, y = data.tensors
    result = {"finder": find_batch_size(finder, lambda n: (x[:n], y[:n]), samples=64).size}
    for name, limit, policy in (("reference", 10**6, "split"), ("recovered", LIMIT, "split"),
                                ("stopped", 8, OOMRecovery("split", max_pieces=2))):
        model = _model(limit=limit, rank=1)
        trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, progress=False,
                               device="cpu", train_metrics=False, on_oom=policy,
                               run_dir=Path(out, name) if name == "stopped" else None)
        try:
            summary = trainer.fit(loader)
            result[name] = {"steps": summary["global_step"], "recoveries": summary["oom_recoveries"]}
        except OutOfMemoryStop as exc:
            result[name] = {"stopped": str(exc), "steps": trainer.loop.global_step}
        torch.save(model.state_dict(), Path(out, f"{name}{rank}.pt"))
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_one_rank_runs_out_and_both_recover_or_both_stop(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["finder"] == r1["finder"] == 21  # every rank takes the smallest answer (24, less 10%)
    assert r0["recovered"] == r1["recovered"] == {"steps": 2, "recoveries": 2}  # counted over ranks, on both
    ref, got = (torch.load(tmp_path / f"{n}0.pt") for n in ("reference", "recovered"))
    assert all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)  # the step without running out
    assert all(torch.equal(got[k], torch.load(tmp_path / "recovered1.pt")[k]) for k in got)
    assert "stopped" in r0["stopped"] and "stopped" in r1["stopped"]
    assert r0["stopped"]["steps"] == r1["stopped"]["steps"] == 0
    assert "another rank ran out of memory" in r0["stopped"]["stopped"]
    assert "as 2 micro-batches" in r1["stopped"]["stopped"]
    assert load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.ckpt")["loop"]["batch_in_epoch"] == 0


# ------------------------------------------------------------------------------------------
# the leak watch, activation checkpointing
# ------------------------------------------------------------------------------------------
class Leaky(Callback):
    """Keeps 34 MB every 4th step: the ever-growing list the leak watch is for. Blocks above glibc's
    largest mmap threshold (32 MB) get fresh pages, so the RSS rises even in a long-lived test
    process whose heap holds freed memory from earlier tests (smaller blocks could reuse it)."""

    def __init__(self):
        self.kept = []

    def on_step_end(self, trainer, info):
        if info.step % 4 == 0:
            self.kept.append(torch.ones(2**23 + 2**19))


@pytest.mark.parametrize("leak", [True, False])
def test_leak_watch_warns_on_a_steady_rise_only(leak, caplog, tmp_path):
    from torchkiln.callbacks.memory import MemoryReport, MemorySnapshot

    loader = DataLoader(_data(512), batch_size=8)
    model = _model(limit=10**6)
    snapshot = MemorySnapshot(2, tmp_path / "snap.pickle")
    with caplog.at_level(logging.INFO, logger="torchkiln"):
        trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, progress=False,
                               device="cpu", train_metrics=False, leak_watch=4,
                               callbacks=[Leaky()] if leak else [snapshot])
        trainer.fit(loader)
    if not leak:  # CUDA only: said, and nothing written
        assert "memory snapshot: CUDA only; not recorded on cpu" in caplog.messages
        assert snapshot.written is None and not (tmp_path / "snap.pickle").exists()
    report = next(cb for cb in trainer.callbacks if isinstance(cb, MemoryReport))
    assert [s for s, _ in report.samples] == list(range(4, 65, 4))
    warned = [r.getMessage() for r in caplog.records if "memory rose steadily" in r.getMessage()]
    assert bool(warned) == leak
    if leak:
        assert "resident (RSS)" in warned[0] and "total_loss += loss" in warned[0]


def test_activation_checkpointing_keeps_the_gradient_and_saves_activations():
    x = torch.randn(32, 64)
    grads, saved = [], []
    for names in (None, ["block"]):
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("block", nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh()))
        model.add_module("head", nn.Linear(64, 10))
        keys = list(model.state_dict())
        checkpoint_modules(model, names)
        with SavedActivations(model) as s:
            loss = model(x).square().mean()
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
        saved.append(s.bytes)
        assert list(model.state_dict()) == keys
    assert all(torch.allclose(a, b) for a, b in zip(*grads))
    assert saved[1] < saved[0]  # the block's inner activations are recomputed, not kept
    with pytest.raises(SettingError, match="no submodule 'bdy'.*body"):
        checkpoint_modules(_model(), ["bdy"])


# ------------------------------------------------------------------------------------------
# kiln doctor
# ------------------------------------------------------------------------------------------
def _facts(**over):
    base = {"torch": "2.7.0", "cuda": "12.6", "cuda_available": True, "gpu_visible": "/dev/nvidia0", "amx": [],
            "gpus": [{"name": "G", "memory": 2**34, "capability": "9.0", "bf16": True, "supported": True}]}
    return {**base, **over}


def test_doctor_rules():
    from torchkiln.commands.doctor import problems

    assert problems(_facts()) == []
    assert "CVE-2025-32434" in problems(_facts(torch="2.5.1"))[0]
    assert "torch cannot use it: this torch is a CPU build" in problems(
        _facts(cuda=None, cuda_available=False, gpus=[]))[0]
    assert "not in this torch build" in problems(_facts(gpus=[{**_facts()["gpus"][0], "supported": False}]))[0]
    cpu = _facts(cuda_available=False, gpu_visible=None, gpus=[])
    assert "lacks amx_bf16" in problems(cpu, ("bf16", "auto"))[0]
    assert problems(cpu, ("bf16", "auto")) and not problems({**cpu, "amx": ["amx_bf16"]}, ("bf16", "auto"))
    assert not problems(_facts(), ("bf16", "auto"))  # on the GPU


def test_doctor_exit_code(cli):
    import torch

    code, out, _ = cli("doctor")
    assert "torch        " in out and "extras       " in out and "CPU AMX" in out
    healthy = not torch.cuda.is_available() or torch.version.cuda
    assert code == (0 if healthy else 1) and out.strip().endswith("nothing wrong found")
    from torchkiln.engine.step import _cpu_flags

    if "amx_fp16" not in _cpu_flags() and not torch.cuda.is_available():
        code, out, _ = cli("doctor", "trainer.precision=fp16")
        assert code == 1 and "warning: trainer.precision: fp16" in out and out.strip().endswith("1 problem(s) found")


# ------------------------------------------------------------------------------------------
# through `kiln`, in fresh processes
# ------------------------------------------------------------------------------------------
MODEL_SOURCE = '''
import torch
from torch import nn


class OOMAbove(nn.Module):
    """Runs out of memory (injected) above 24 samples."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x):
        if x.shape[0] > 24:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.net(x)
'''


def test_kiln_find_batch_size_names_margin_when_it_is_wrong_before_anything_runs(tmp_path):
    """--margin is a flag, not a config key (it said `trainer.margin`, once the finder had started):
    refused before the config is even read (the one given is not there)."""
    for margin in ("2", "-0.1"):
        proc = kiln("find-batch-size", "-c", str(tmp_path / "missing.yaml"), "--margin", margin, cwd=tmp_path)
        assert (proc.returncode, proc.stdout) == (2, "")
        assert proc.stderr == f"error: --margin: expected a fraction in [0, 1); found {float(margin)}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def oom_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oom")
    (tmp / "oom_model.py").write_text(MODEL_SOURCE)
    cfg = small_config(tmp, model={"type": "oom_model:OOMAbove", "args": {"num_classes": 10}},
                       trainer={"epochs": 1, "monitor": "val/accuracy"},
                       data={"dataset": {"type": "Digits"}, "val_split": 0.2, "test_split": 0.1,
                             "batch_size": 32, "eval_batch_size": 16})
    path = write_config(tmp, cfg)
    runs = {
        "find": kiln("find-batch-size", "-c", str(path), cwd=tmp, check=True),
        "split": kiln("train", "-c", str(path), "trainer.on_oom=split", "name=split", cwd=tmp, check=True),
        "auto": kiln("train", "-c", str(path), "data.batch_size=auto", "name=auto", cwd=tmp, check=True),
        "stop": kiln("train", "-c", str(path), "name=stop", cwd=tmp),
        "root": tmp,
    }
    return runs


def _run_dir(root: Path, name: str) -> Path:
    return next((root / "runs" / name).iterdir())


@pytest.mark.slow
def test_kiln_find_batch_size_prints_each_try_and_the_answer_last(oom_runs):
    out = oom_runs["find"].stdout.strip().splitlines()
    assert out[-1] == "21"
    assert out[-2] == "binsearch: the largest batch that fits is 24; with a 10% margin: 21"
    assert "batch     32: out of memory" in out and any(line.startswith("batch     24: fits, peak") for line in out)


@pytest.mark.slow
def test_kiln_train_split_logs_and_counts_recoveries(oom_runs):
    run = _run_dir(oom_runs["root"], "split")
    summary = json.loads((run / "summary.json").read_text())
    steps = summary["global_step"]
    assert steps > 1 and summary["oom_recoveries"] == steps - 1  # every batch of 32; the last, smaller, fits
    log = (run / "train.log").read_text()
    assert log.count("recovered as 2 micro-batches of up to 16") == steps - 1


@pytest.mark.slow
def test_kiln_train_batch_size_auto_logs_the_choice(oom_runs):
    run = _run_dir(oom_runs["root"], "auto")
    assert "data.batch_size: auto -> 21" in (run / "train.log").read_text()
    assert "batch_size: 21" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_kiln_train_stop_ends_in_one_line_with_last_ckpt(oom_runs):
    proc = oom_runs["stop"]
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "out of memory at epoch 1, batch 1 (32 samples)" in error[0]
    assert "Try: data.batch_size=16 trainer.accumulate=2" in error[0]
    assert (_run_dir(oom_runs["root"], "stop") / "checkpoints" / "last.ckpt").is_file()


def test_gpu_memory_script_skips_cleanly_without_cuda(tmp_path):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("memory_check", ROOT / "benchmarks" / "memory_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    if torch.cuda.is_available():
        pytest.skip("runs for real on a GPU (benchmarks/device_check.sh)")
    assert script.main(["--out", str(tmp_path / "m.md")]) == 0 and not (tmp_path / "m.md").exists()
