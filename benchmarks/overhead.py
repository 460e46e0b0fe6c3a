"""Overhead: one model, data, optimizer, schedule and seed, trained by a hand-written loop, torchkiln and Lightning.

    PYTHONPATH=src python benchmarks/overhead.py [--epochs 10] [--repeats 5] [--out benchmarks/results/overhead.md]

Every variant trains the default config's shape (SmallCNN on the digits, train/val/test split
0.7/0.2/0.1 stratified with the config's seed, batch 64, AdamW lr 3e-3 wd 0.01, OneCycleLR
max_lr 1e-2 stepped per optimizer step, grad-norm clipping at 1.0, cross-entropy with label
smoothing 0.1, fp32) for the same epochs, with a validation pass (loss, accuracy) after each epoch:

- hand loop, DataLoader: the textbook loop over a torch DataLoader of the same tensors.
- hand loop, index slicing: the same loop, batches by `x[idx]` (what torchkiln's fast path does).
- torchkiln, defaults: `torchkiln.commands.train.train` on the default config, i.e. what `kiln train` does:
  run directory, train.log, progress bar, train and val metrics (accuracy, f1_macro), per-step
  loss/LR/grad-norm rows, CSV + JSONL + TensorBoard, best.ckpt and last.ckpt every epoch
  (fsynced), summary.json and the curves plot. Digits are in-memory tensors, so its default data
  path is the fast (index slicing) path; a second row forces the DataLoader (data.fast_path=false).
- torchkiln, off: `run.build_trainer` without a run directory (no checkpoints, no loggers, no
  files), progress off; train metrics still on (they are part of the Trainer's defaults).
- Lightning, defaults / off: a LightningModule with the same model and optimizer; Trainer
  defaults (progress bar, TensorBoard logger, ModelCheckpoint, model summary, sanity check) or
  logger, checkpointing, progress bar and model summary off.

Every variant sees the same batches in the same order (the order of epoch e is
randperm(n, seed + e), as torchkiln's sampler draws it) and the same dropout masks, so the final
losses of torchkiln and of the hand loop must agree to float rounding: the script asserts it.

A run is timed whole, from building the model to the last file written (Lightning's import and
torchkiln's pydantic/matplotlib imports are paid in an untimed warm-up round); seconds per epoch
is that wall time over the epochs, the median over `--repeats` interleaved rounds. Progress bars
draw into a stand-in terminal that discards what it is given, so they cost what they cost in a
terminal minus the terminal itself. Early stopping is off so that every run trains every epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Run from a checkout: measure the torchkiln beside this script, installed or not.
_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "torchkiln").is_dir():
    sys.path.insert(0, str(_SRC))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # beside it: machine.py

import torch  # noqa: E402
from machine import machine  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Sampler, TensorDataset  # noqa: E402

from torchkiln.config.load import (  # noqa: E402
    apply_overrides,
    default_config_path,
    read_file,
    resolve,
)
from torchkiln.config.schema import to_plain  # noqa: E402
from torchkiln.models.small import SmallCNN  # noqa: E402
from torchkiln.registry import MODELS  # noqa: E402

# ------------------------------------------------------------------------------------------
# shared set-up: the config's data split, batch order and model
# ------------------------------------------------------------------------------------------
VARIANTS = {
    # name: (family, data path, extras on)
    "hand-dataloader": ("hand loop", "DataLoader", False),
    "hand-slicing": ("hand loop", "index slicing", False),
    "torchkiln-defaults": ("torchkiln", "index slicing", True),
    "torchkiln-defaults-dataloader": ("torchkiln", "DataLoader", True),
    "torchkiln-off": ("torchkiln", "index slicing", False),
    "lightning-defaults": ("Lightning", "DataLoader", True),
    "lightning-off": ("Lightning", "DataLoader", False),
}


EPOCH_STARTS: list[float] = []
EVAL_SPANS: list[tuple[float, float]] = []


class ClockedSmallCNN(SmallCNN):
    """SmallCNN that notes when each epoch's first training forward starts, and when each
    evaluation forward starts and ends: the same clock for every variant, since each builds this
    model (torchkiln by name from its registry)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._was_training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        if self.training and not self._was_training:
            EPOCH_STARTS.append(started)
        self._was_training = self.training
        out = super().forward(x)
        if not self.training:
            EVAL_SPANS.append((started, time.perf_counter()))
        return out


MODELS.register(ClockedSmallCNN)


class EpochOrder(Sampler[list[int]]):
    """Batches of epoch e in the order randperm(n, seed + e); the epoch is counted by iteration."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        self.epoch += 1
        yield from (order[i:i + self.batch_size].tolist() for i in range(0, self.n, self.batch_size))

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


class SlicedBatches:
    """Index slicing over in-memory tensors: `order` batches, or the tensors in order (evaluation)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int | None):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.order = EpochOrder(len(y), batch_size, seed) if seed is not None else None

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        if self.order is None:
            for i in range(0, len(self.y), self.batch_size):
                yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]
            return
        for idx in self.order:
            idx = torch.as_tensor(idx)
            yield self.x[idx], self.y[idx]


@dataclass
class Setup:
    cfg: object
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    epochs: int
    workdir: Path

    @property
    def batch_size(self) -> int:
        return self.cfg.data.batch_size

    def loaders(self, path: str):
        b, seed = self.batch_size, self.cfg.seed
        if path == "index slicing":
            return (SlicedBatches(self.x_train, self.y_train, b, seed),
                    SlicedBatches(self.x_val, self.y_val, b, None))
        train = DataLoader(TensorDataset(self.x_train, self.y_train),
                           batch_sampler=EpochOrder(len(self.y_train), b, seed),
                           generator=torch.Generator())
        # A DataLoader without its own generator draws a seed from the global RNG at every
        # iteration, which would shift every later dropout mask: give it one, as torchkiln does.
        val = DataLoader(TensorDataset(self.x_val, self.y_val), batch_size=b, generator=torch.Generator())
        return train, val

    def model(self) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        return ClockedSmallCNN(**self.cfg.model.args)

    def optimizer(self, model: nn.Module, steps_per_epoch: int):
        opt = torch.optim.AdamW(model.parameters(), **self.cfg.optimizer.args)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, **self.cfg.scheduler.args,
                                                    total_steps=self.epochs * steps_per_epoch)
        return opt, sched

    def loss_fn(self) -> nn.Module:
        return nn.CrossEntropyLoss(**self.cfg.loss.args)


def make_setup(epochs: int, workdir: Path, overrides: list[str]) -> Setup:
    from torchkiln.data.digits import Digits
    from torchkiln.data.splits import split_dataset

    data = apply_overrides(read_file(default_config_path()), [f"trainer.epochs={epochs}",
                                                               "trainer.early_stop=null", *overrides])
    cfg = resolve(data, "default config")
    assert cfg.model.type == "SmallCNN" and cfg.optimizer.type == "AdamW" and cfg.scheduler.type == "OneCycleLR"
    d = cfg.data
    ds = Digits(**d.dataset.args)
    train, val, _ = split_dataset(ds, d.val_split, d.test_split, d.split_seed or cfg.seed, stratify=d.stratify)
    x, y = ds.fast_tensors()
    ti, vi = torch.as_tensor(train.indices), torch.as_tensor(val.indices)
    return Setup(cfg, x[ti], y[ti], x[vi], y[vi], epochs, workdir)


# ------------------------------------------------------------------------------------------
# the variants: each returns (train loss of the last epoch, val loss, val accuracy)
# ------------------------------------------------------------------------------------------
def run_hand(s: Setup, path: str) -> tuple[float, float, float]:
    """The textbook loop: train mode, forward, loss, backward, clip, step, schedule; eval pass."""
    model = s.model()
    train, val = s.loaders(path)
    opt, sched = s.optimizer(model, len(train))
    loss_fn = s.loss_fn()
    clip = s.cfg.trainer.grad_clip
    for _ in range(s.epochs):
        model.train()
        loss_sum, count = torch.zeros(()), 0
        for x, y in train:
            loss = loss_fn(model(x), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(y)
            count += len(y)
        train_loss = float(loss_sum / count)
        model.eval()
        val_sum, correct, n = torch.zeros(()), torch.zeros((), dtype=torch.int64), 0
        with torch.inference_mode():
            for x, y in val:
                out = model(x)
                val_sum += loss_fn(out, y) * len(y)
                correct += (out.argmax(1) == y).sum()
                n += len(y)
        val_loss, val_acc = float(val_sum / n), float(correct) / n
    return train_loss, val_loss, val_acc


def run_torchkiln(s: Setup, path: str, extras: bool) -> tuple[float, float, float]:
    from torchkiln.commands import train as run

    overrides = [f"output_dir={s.workdir / 'runs'}", "model.type=ClockedSmallCNN"]
    if path == "DataLoader":
        overrides.append("data.fast_path=false")
    cfg = resolve(apply_overrides(to_plain(s.cfg), overrides), "default config")
    if extras:  # what `kiln train` does
        _, summary = run.train(cfg, progress=True)
    else:  # the Python API without a run directory: no files, no checkpoints, no progress
        trainer, loaders = run.build_trainer(cfg, None, progress=False)
        summary = trainer.fit(loaders["train"], loaders.get("val"))
    final = summary["final"]
    return final["train/loss"], final["val/loss"], final["val/accuracy"]


def run_lightning(s: Setup, path: str, extras: bool) -> tuple[float, float, float]:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = s.model()
            self.loss_fn = s.loss_fn()

        def training_step(self, batch, _):
            x, y = batch
            loss = self.loss_fn(self.model(x), y)
            self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(y))
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            out = self.model(x)
            self.log("val/loss", self.loss_fn(out, y), batch_size=len(y))
            self.log("val/accuracy", (out.argmax(1) == y).float().mean(), batch_size=len(y))

        def configure_optimizers(self):
            opt, sched = s.optimizer(self.model, steps_per_epoch)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    train, val = s.loaders(path)
    steps_per_epoch = len(train)
    off = {} if extras else dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False)
    trainer = L.Trainer(max_epochs=s.epochs, accelerator="cpu", devices=1,
                        gradient_clip_val=s.cfg.trainer.grad_clip, default_root_dir=str(s.workdir / "lightning"),
                        **off)
    trainer.fit(Module(), train, val)
    m = trainer.callback_metrics
    return float(m["train/loss_epoch"]), float(m["val/loss"]), float(m["val/accuracy"])


@dataclass
class Timing:
    total: float  # the whole run, model built to last file written
    starts: list[float]  # each epoch's first training step
    evals: list[tuple[float, float]] = field(default_factory=list)  # each evaluation forward

    @property
    def phases(self) -> tuple[float, float, float]:
        """The median epoch's parts: training (first training forward to the first validation
        forward), validation (to the end of the last validation forward) and the epoch's end (to
        the next epoch's first training forward: metrics, logging, checkpoints, the next start)."""
        parts = []
        for a, b in zip(self.starts, self.starts[1:]):
            spans = [e for e in self.evals if a < e[0] < b]
            if spans:
                parts.append((spans[0][0] - a, spans[-1][1] - spans[0][0], b - spans[-1][1]))
        if not parts:
            return (math.nan, math.nan, math.nan)
        return tuple(statistics.median(p[i] for p in parts) for i in range(3))  # type: ignore[return-value]

    @property
    def epoch(self) -> float:
        """The median epoch, from one epoch's first training step to the next one's (a one-epoch
        run has no such interval: its whole run stands in)."""
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:])]
        return statistics.median(gaps) if gaps else self.total

    @property
    def fastest(self) -> float:
        """The run's fastest epoch: interference from the rest of the machine only ever adds time."""
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:])]
        return min(gaps) if gaps else self.total

    @property
    def fixed(self) -> float:
        return self.total - len(self.starts) * self.epoch


def run_variant(name: str, s: Setup) -> tuple[Timing, tuple[float, float, float]]:
    family, path, extras = VARIANTS[name]
    EPOCH_STARTS.clear()
    EVAL_SPANS.clear()
    with terminal():
        started = time.perf_counter()
        if family == "hand loop":
            result = run_hand(s, path)
        elif family == "torchkiln":
            result = run_torchkiln(s, path, extras)
        else:
            result = run_lightning(s, path, extras)
        seconds = time.perf_counter() - started
    for sub in ("runs", "lightning"):
        shutil.rmtree(s.workdir / sub, ignore_errors=True)
    if len(EPOCH_STARTS) != s.epochs:
        raise RuntimeError(f"{name}: the clock saw {len(EPOCH_STARTS)} epochs, expected {s.epochs}")
    return Timing(seconds, list(EPOCH_STARTS), list(EVAL_SPANS)), result


# ------------------------------------------------------------------------------------------
# a stand-in terminal for progress bars and console logs
# ------------------------------------------------------------------------------------------
class NullTerminal(io.TextIOBase):
    """Says it is a terminal (so progress bars draw) and discards what it is given."""

    def isatty(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        return len(s)


@contextlib.contextmanager
def terminal():
    """stdout and stderr to a NullTerminal, torchkiln's console log on it as `kiln train` sets it."""
    tty = NullTerminal()
    handler = logging.StreamHandler(tty)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("torchkiln")
    saved = (sys.stdout, sys.stderr, log.level, log.propagate)
    sys.stdout = sys.stderr = tty
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved[0], saved[1]
        log.removeHandler(handler)
        log.setLevel(saved[2])
        log.propagate = saved[3]


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    timings: list[Timing] = field(default_factory=list)
    result: tuple[float, float, float] | None = None

    @property
    def family(self) -> str:
        return VARIANTS[self.name][0]

    @property
    def path(self) -> str:
        return VARIANTS[self.name][1]

    @property
    def extras(self) -> bool:
        return VARIANTS[self.name][2]

    def steady(self) -> float:
        """Seconds per epoch once running: the median epoch of each run, median over runs."""
        return statistics.median(t.epoch for t in self.timings)

    def whole(self) -> float:
        """Seconds per run, median over runs."""
        return statistics.median(t.total for t in self.timings)

    def fixed(self) -> float:
        """Seconds per run that are not epochs: set-up, the first epoch's extra, the end."""
        return statistics.median(t.fixed for t in self.timings)

    def fastest(self) -> float:
        """The fastest epoch of every run."""
        return min(t.fastest for t in self.timings)

    def paired(self, ref: Row, what: str = "epoch") -> tuple[float, float, float]:
        """Against `ref`, round by round (each round runs every variant back to back, so the
        machine's drift between rounds cancels): median, lowest and highest ratio."""
        ratios = sorted(getattr(a, what) / getattr(b, what) for a, b in zip(self.timings, ref.timings))
        return statistics.median(ratios), ratios[0], ratios[-1]

    def extra_ms(self, ref: Row) -> list[float]:
        """Milliseconds per epoch more than `ref` in each phase (training, validation, epoch end)
        and in all, paired by round: the median of the rounds' differences."""
        diffs = [[1e3 * (x - y) for x, y in zip(a.phases, b.phases)] for a, b in zip(self.timings, ref.timings)]
        diffs = [d + [sum(d)] for d in diffs]
        return [statistics.median(d[i] for d in diffs) for i in range(4)]



def versions() -> str:
    parts = [f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    with contextlib.suppress(ImportError):
        import lightning

        parts.append(f"lightning {lightning.__version__}")
    return ", ".join(parts)


def check_agreement(rows: dict[str, Row], rtol: float) -> list[str]:
    """torchkiln and the hand loop saw the same batches: their final losses must agree."""
    problems = []
    for kiln, hand in (("torchkiln-defaults", "hand-slicing"), ("torchkiln-off", "hand-slicing"),
                       ("torchkiln-defaults-dataloader", "hand-dataloader")):
        if kiln in rows and hand in rows and rows[kiln].result and rows[hand].result:
            for what, a, b in zip(("train loss", "val loss", "val accuracy"), rows[kiln].result, rows[hand].result):
                if not math.isclose(a, b, rel_tol=rtol, abs_tol=1e-7):
                    problems.append(f"{kiln} vs {hand}: {what} {a:.6f} != {b:.6f}")
    return problems


def table(rows: dict[str, Row], epochs: int, repeats: int, load: str) -> str:
    hand = {r.path: r for r in rows.values() if r.family == "hand loop" and r.timings}
    lines = [
        f"# Overhead against a hand-written loop ({time.strftime('%Y-%m-%d')})",
        "",
        f"The default config's shape (SmallCNN on digits, batch 64, AdamW + OneCycleLR, clip 1.0, fp32),"
        f" {epochs} epochs, median of {repeats} interleaved repeats. Machine: {machine()}; {versions()};"
        f" load average {load}.",
        "",
        "- **epoch**: seconds from one epoch's first training step to the next one's (training, validation,"
        " end-of-epoch logging and checkpoints), the median epoch of a run.",
        "- **run / epochs**: the whole run (model built to last file written: run directory, plots) over"
        " the epochs; **fixed**: what the run spends outside its epochs (set-up, the end).",
        "- **x hand**: against the hand loop with the same data path, paired by round: each round runs"
        " every variant back to back, the ratio is taken within the round, and the median of the rounds'"
        " ratios is shown with the lowest and highest (the machine drifts by 10-20% between rounds, less"
        " within one). Losses are the last epoch's; every variant sees the same batches and dropout masks.",
        "- **fastest epoch**: the fastest epoch of all its runs, and its ratio to the hand loop's: the"
        " least disturbed measure on a shared machine, where other work only ever adds time.",
        "",
        "| variant | data path | logging, progress, checkpoints | epoch (s) | x hand | (range) | fastest epoch (s)"
        " | x hand | run / epochs (s) | x hand | fixed (s) | train loss | val loss | val acc |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows.values():
        if not r.timings:
            continue
        ref = hand.get(r.path)
        steady_x = whole_x = spread = fastest_x = ""
        if ref is not None:
            mid, low, high = r.paired(ref, "epoch")
            steady_x, spread = f"{mid:.3f}x", f"{low:.2f}-{high:.2f}"
            whole_x = f"{r.paired(ref, 'total')[0]:.2f}x"
            fastest_x = f"{r.fastest() / ref.fastest():.3f}x"
        extras = "-" if r.family == "hand loop" else ("on (defaults)" if r.extras else "off")
        loss = "| | |" if r.result is None else f"| {r.result[0]:.5f} | {r.result[1]:.5f} | {r.result[2]:.4f} |"
        lines.append(f"| {r.family} | {r.path} | {extras} | {r.steady():.4f} | {steady_x} | {spread} |"
                     f" {r.fastest():.4f} | {fastest_x} | {r.whole() / epochs:.4f} | {whole_x} | {r.fixed():.3f} {loss}")
    lines += [
        "",
        "Where the extra time goes: milliseconds per epoch more than the hand loop with the same data"
        " path, by phase (paired by round, median over rounds). **training**: from an epoch's first"
        " training forward to its first validation forward (steps, per-step logging, progress, the train"
        " metrics); **validation**: the validation forwards and what runs between them; **epoch end**:"
        " from the last validation forward to the next epoch's first training forward (metrics, epoch"
        " logging, checkpoints, the next epoch's start); **all**: the median of the rounds' totals (not the"
        " sum of the columns' medians).",
        "",
        "| variant | data path | logging, progress, checkpoints | hand loop epoch (ms) | training | validation"
        " | epoch end | all |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows.values():
        ref = hand.get(r.path)
        if not r.timings or ref is None or r.family == "hand loop":
            continue
        extras = "on (defaults)" if r.extras else "off"
        cells = " | ".join(f"{v:+.2f}" for v in r.extra_ms(ref))
        lines.append(f"| {r.family} | {r.path} | {extras} | {1e3 * ref.steady():.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed first round")
    p.add_argument("--rtol", type=float, default=1e-5, help="torchkiln vs hand loop final-loss tolerance")
    p.add_argument("--out", default="benchmarks/results/overhead.md")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="applied to the default config")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    try:
        import lightning  # noqa: F401
    except ImportError:
        dropped = [n for n in names if VARIANTS[n][0] == "Lightning"]
        if dropped:
            print(f"lightning is not installed (pip install -e '.[dev]'): skipping {', '.join(dropped)}")
        names = [n for n in names if VARIANTS[n][0] != "Lightning"]
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # as `kiln train` sets it, for every variant
    load_start = os.getloadavg()[0]

    rows = {n: Row(n) for n in names}
    with tempfile.TemporaryDirectory(prefix="kiln-overhead-") as tmp:
        s = make_setup(args.epochs, Path(tmp), args.overrides)
        if not args.no_warmup:  # imports and first-call costs, paid once per process
            warm = make_setup(1, Path(tmp), args.overrides)
            for n in names:
                run_variant(n, warm)
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]  # interleaved, rotated
            for n in order:
                timing, result = run_variant(n, s)
                rows[n].timings.append(timing)
                rows[n].result = result
                print(f"repeat {rep + 1}/{args.repeats} {n:30s} epoch {timing.epoch:.4f} s"
                      f"  run {timing.total:.3f} s"
                      f"  final train loss {result[0]:.6f} val loss {result[1]:.6f}", flush=True)
    load = f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    text = table(rows, args.epochs, args.repeats, load)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    problems = check_agreement(rows, args.rtol)
    for problem in problems:
        print(f"MISMATCH: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
