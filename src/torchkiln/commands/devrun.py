"""`kiln train --fast-dev-run [N]` and `kiln train --overfit-batches N`: does training work at all?

Both run the real `kiln train` path (commands/train.py:train: every callback, logger and run file)
on a few batches, chosen by `batches(cfg, data, loaders)` once the run's parts are built.

--fast-dev-run N (default 2): N batches of train, val and test through one epoch, in a temporary
run directory removed afterwards: the run's files and loggers, a checkpoint written and loaded
back (weights_only), a resume from it for a second epoch, the test split on the best weights and
the training checks. One line per check with what it cost; exit 0 only if all passed.

--overfit-batches N: the same N training batches every epoch (shuffle, augmentation, mixup, the
balanced sampler and the scheduler off: a constant LR), validated on themselves, for 50 epochs
unless `trainer.epochs=K` is given. The verdict: the final validation loss on those batches as a
share of the first epoch's training loss, against `--overfit-threshold` (default 0.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchkiln.commands.logs import console
from torchkiln.errors import ConfigError, KilnError
from torchkiln.rundir import BEST, CHECKPOINTS, CONFIG, LAST, SUMMARY, TRAIN_LOG

OVERFIT_EPOCHS = 50
# what --overfit-batches turns off, after the user's overrides
OVERFIT_OFF = ["data.shuffle=false", "data.transforms.train=[]", "data.mixup=null", "data.sampler=default",
               "scheduler=null", "trainer.early_stop=null", "trainer.swa=null"]


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float

    def line(self) -> str:
        return f"  {'ok  ' if self.ok else 'FAIL'}  {self.name:<11} {self.detail}  ({self.seconds:.2f} s)"


def main(args: argparse.Namespace) -> int:
    if args.resume or args.folds or args.devices > 1:
        raise ConfigError("--fast-dev-run / --overfit-batches: a short run of its own; leave out --resume,"
                          " --folds and --devices")
    if args.fast_dev_run is not None and args.overfit_batches is not None:
        raise ConfigError("--fast-dev-run and --overfit-batches: give one of them")
    n = args.fast_dev_run if args.fast_dev_run is not None else args.overfit_batches  # >= 1 (cli.Bounded)
    console(quiet=True)  # the checks' lines are the output; warnings still show
    if args.fast_dev_run is not None:
        checks = fast_dev_run(args.config, list(args.overrides), n)
        return 0 if all(c.ok for c in checks) else 1
    passed, _ = overfit(args.config, list(args.overrides), n, args.overfit_threshold)
    return 0 if passed else 1


def first_batches(n: int, same: bool = False) -> Callable[[Any, Any, dict[str, Any]], dict[str, Any]]:
    """The loaders over the first `n` batches of each split (`same`: validation on the training batches)."""
    def pick(cfg: Any, data: Any, loaders: dict[str, Any]) -> dict[str, Any]:
        from torch.utils.data import Subset

        from torchkiln.config.build import build_loaders

        def head(ds: Any, size: int) -> Any:
            return None if ds is None else Subset(ds, range(min(len(ds), n * size)))

        eval_size = cfg.data.eval_batch_size or cfg.data.batch_size
        train = head(data.train, cfg.data.batch_size)
        val = train if same else head(data.val, eval_size)
        return build_loaders(cfg, dataclasses.replace(data, train=train, val=val, test=head(data.test, eval_size)))

    return pick


def _load(config: str | None, overrides: list[str]) -> Any:
    from torchkiln.config.load import load_checked

    return load_checked(config, overrides)


# ------------------------------------------------------------------------------------------
# --fast-dev-run
# ------------------------------------------------------------------------------------------
def fast_dev_run(config: str | None, overrides: list[str], n: int = 2) -> list[Check]:
    """Run the checks, print one line each and a total; the temporary run directory is removed."""
    tmp = Path(tempfile.mkdtemp(prefix="kiln-fast-dev-run-"))
    started = time.perf_counter()
    print(f"fast-dev-run: {n} batch(es) of train, val and test, in {tmp} (removed afterwards)", flush=True)
    checks: list[Check] = []
    try:
        _run_checks(config, overrides, n, tmp, checks)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = [c.name for c in checks if not c.ok]
    total = time.perf_counter() - started
    print(f"fast-dev-run {'passed' if not failed else 'FAILED'}: {len(checks) - len(failed)}/{len(checks)} checks"
          f" in {total:.1f} s" + (f" (failed: {', '.join(failed)})" if failed else ""), flush=True)
    return checks


def _step(checks: list[Check], name: str, fn: Callable[[], Any]) -> bool:
    """Run one check: its line is printed at once; a KilnError or any failure is the check's FAIL."""
    t = time.perf_counter()
    try:
        detail, ok = fn(), True
    except KilnError as exc:
        detail, ok = str(exc), False
    except Exception as exc:  # noqa: BLE001 - a fast dev run reports whatever broke, on its line
        detail, ok = f"{type(exc).__name__}: {exc}", False
    if isinstance(detail, tuple):  # (detail, ok) from a check that judges its own result
        detail, ok = detail
    checks.append(Check(name, ok, detail, time.perf_counter() - t))
    print(checks[-1].line(), flush=True)
    return ok


def _run_checks(config: str | None, overrides: list[str], n: int, tmp: Path, checks: list[Check]) -> None:
    from torchkiln.commands.train import train

    forced = [f"output_dir={tmp}", "trainer.epochs=1"]
    ctx: dict[str, Any] = {}

    def build() -> str:
        ctx["cfg"] = cfg = _load(config, overrides + forced)
        return f"config {config or 'default'} valid, every name and argument resolves ({cfg.name})"

    def fit() -> tuple[str, bool]:
        ctx["run"], s = train(ctx["cfg"], progress=False, batches=first_batches(n))
        ctx["summary"] = s
        final, k = s["final"], ctx["cfg"].trainer.accumulate
        want = math.ceil(n / k)
        shown = ", ".join(f"{key} {final[key]:.4g}" for key in ("train/loss", "val/loss", s["monitor"])
                          if key in final)
        ok = s["global_step"] == want and all(math.isfinite(v) for v in final.values() if isinstance(v, float))
        return f"1 epoch, {s['global_step']} optimizer step(s), callbacks and loggers ran; {shown}", ok

    def files() -> tuple[str, bool]:
        c, run = ctx["cfg"].logging, ctx["run"]
        want = [CONFIG, TRAIN_LOG, SUMMARY] + (["metrics.csv", "metrics.jsonl"] if c.csv else [])
        want += ["tensorboard"] if c.tensorboard else []
        missing = [w for w in want if not (run / w).exists()]
        return (f"missing {', '.join(missing)}" if missing else f"{', '.join(want)} written"), not missing

    def checkpoint() -> str:
        from torchkiln.engine.checkpoint import load_checkpoint, model_weights, weights_kind

        folder = ctx["run"] / CHECKPOINTS
        names = [p for p in (LAST, BEST) if (folder / p).is_file()]
        if LAST not in names:
            raise KilnError(f"no {LAST} in {folder}")
        state = load_checkpoint(folder / LAST)  # weights_only, as every load
        weights = model_weights(state)
        return f"{', '.join(names)} written; {LAST} loaded back: {len(weights)} tensors ({weights_kind(state)})"

    def resume() -> tuple[str, bool]:
        cfg = ctx["cfg"].model_copy(update={"trainer": ctx["cfg"].trainer.model_copy(update={"epochs": 2})})
        ctx["cfg"] = cfg
        _, s = train(cfg, resume=ctx["run"] / CHECKPOINTS / LAST, progress=False, batches=first_batches(n))
        ok = s["epochs_completed"] == 2 and s["global_step"] == 2 * ctx["summary"]["global_step"]
        ctx["summary"] = s
        return f"from {LAST} at epoch 2: {s['global_step']} steps in all, same run directory", ok

    def test() -> tuple[str, bool]:
        return _test_split(ctx["cfg"], ctx["run"], n)

    def training_checks() -> tuple[str, bool]:
        found = (ctx["summary"].get("checks") or {}).get("findings")
        if found is None:
            return "trainer.checks: off", True
        return ("; ".join(found) if found else "no findings (loss, gradients, unused parameters)"), not found

    for name, fn, needs in (("build", build, None), ("train", fit, "cfg"), ("run files", files, "run"),
                            ("checkpoint", checkpoint, "run"), ("resume", resume, "run"),
                            ("test", test, "run"), ("checks", training_checks, "summary")):
        if needs is not None and needs not in ctx:
            checks.append(Check(name, False, "not run: an earlier check failed", 0.0))
            print(checks[-1].line(), flush=True)
            continue
        _step(checks, name, fn)


def _test_split(cfg: Any, run: Path, n: int) -> tuple[str, bool]:
    """The test split's first batches on the best checkpoint's inference weights, as `kiln test` takes them."""
    from torchkiln.commands.train import build_parts, stored_normalization
    from torchkiln.engine.checkpoint import load_checkpoint, model_weights

    ckpt = run / CHECKPOINTS / (BEST if (run / CHECKPOINTS / BEST).is_file() else LAST)
    state = load_checkpoint(ckpt)
    trainer, loaders, data = build_parts(cfg, progress=False, pretrained=False,
                                         normalization=stored_normalization(state))
    loaders = first_batches(n)(cfg, data, loaders)
    if "test" not in loaders:
        return "no test split (data.test_split / data.test_dataset): skipped", True
    trainer.load_weights(model_weights(state))
    result = trainer.evaluate(loaders["test"], "test")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items())
    return f"{ckpt.name}: {shown}", all(math.isfinite(v) for v in result.values())


# ------------------------------------------------------------------------------------------
# --overfit-batches
# ------------------------------------------------------------------------------------------
def overfit(config: str | None, overrides: list[str], n: int, threshold: float = 0.1) -> tuple[bool, float]:
    """Train on the same `n` batches, validated on themselves; prints the verdict line last."""
    from torchkiln.commands.train import train
    from torchkiln.engine.checkpoint import load_checkpoint

    cfg = _load(config, [f"trainer.epochs={OVERFIT_EPOCHS}", *overrides, *OVERFIT_OFF])
    cfg = cfg.model_copy(update={"name": f"{cfg.name}-overfit"})  # its runs beside the config's own
    print(f"overfit-batches: the same {n} training batch(es) for {cfg.trainer.epochs} epochs, validated on"
          " themselves (shuffle, augmentation, mixup and the scheduler off)", flush=True)
    run, summary = train(cfg, progress=False, batches=first_batches(n, same=True))
    history = load_checkpoint(run / CHECKPOINTS / LAST)["loop"]["history"]
    start, end = history[0]["train/loss"], history[-1]["val/loss"]
    share = end / start if start > 0 else float("nan")
    passed = math.isfinite(share) and share <= threshold
    extra = f", {summary['monitor']} {history[-1][summary['monitor']]:.4g}" if summary["monitor"] in history[-1] else ""
    print(f"run directory {run}")
    print(f"overfit {'PASS' if passed else 'FAIL'}: the loss fell from {start:.4g} to {end:.4g}, {share:.1%} of its"
          f" start (threshold {threshold:.0%}){extra}", flush=True)
    return passed, share
