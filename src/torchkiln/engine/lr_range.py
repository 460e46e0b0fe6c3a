"""The LR range test: train with an exponentially rising learning rate and watch the loss.

`range_test(trainer, loader)` takes `steps` optimizer steps through the Trainer's own parts (the
placement, the task's forward and loss, `OptimizerStep`: precision, scaling, clipping), the
learning rate going from `start` to `end` geometrically (each parameter group keeps its ratio to
the largest group LR). The loss is smoothed by a bias-corrected exponential moving average
(`beta`); the test stops early once the smoothed loss passes `diverge` times its minimum, or a
loss is not finite. The model's weights and buffers, the optimizer's state and LRs, the scaler's
state and every RNG are put back afterwards: the Trainer trains as if the test had not run.

Two suggestions, both reported:
- valley (fastai's rule, the one suggested): the longest decreasing run of the smoothed loss (the
  longest decreasing subsequence, not necessarily contiguous), and the LR halfway along it.
- steepest: where the smoothed loss falls fastest against log LR, before its minimum. Lightning's
  suggestion; on noisy curves a single steep point is fragile (Lightning issue #21141), which is
  why the valley is the one suggested.
Accumulation is left out: each batch is one step of the test.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from torchkiln.data.loaders import set_loader_epoch
from torchkiln.errors import SettingError, TrainingError
from torchkiln.seeding import rng_state, set_rng_state


@dataclass
class RangeTest:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # as measured, per step
    smoothed: list[float] = field(default_factory=list)
    stop: str = "end LR reached"
    valley: int | None = None  # indices into lrs
    steepest: int | None = None

    @property
    def suggestion(self) -> float:
        if self.valley is None:
            raise TrainingError("lr-find: too few steps before the loss diverged to suggest an LR;"
                                " lower --start or raise --steps")
        return self.lrs[self.valley]

    def to_dict(self) -> dict[str, Any]:
        def pick(i: int | None) -> float | None:
            return None if i is None else self.lrs[i]

        return {"lrs": self.lrs, "losses": self.losses, "smoothed": self.smoothed, "stop": self.stop,
                "valley": pick(self.valley), "steepest": pick(self.steepest)}


def valley(losses: list[float]) -> int | None:
    """Index halfway along the longest decreasing subsequence of `losses` (None below 3 points)."""
    n = len(losses)
    if n < 3:
        return None
    length, prev = [1] * n, [-1] * n
    for i in range(n):
        for j in range(i):
            if losses[j] > losses[i] and length[j] + 1 > length[i]:
                length[i], prev[i] = length[j] + 1, j
    end = max(range(n), key=lambda i: (length[i], -i))
    start = end
    while prev[start] != -1:
        start = prev[start]
    return start + (end - start) // 2


def steepest(lrs: list[float], losses: list[float]) -> int | None:
    """Index of the most negative slope of `losses` against log10(lr), up to the loss's minimum."""
    last = min(range(len(losses)), key=losses.__getitem__) if losses else 0
    if last < 2:
        return None
    logs = torch.tensor([math.log10(x) for x in lrs[: last + 1]], dtype=torch.float64)
    values = torch.tensor(losses[: last + 1], dtype=torch.float64)
    slopes = torch.gradient(values, spacing=(logs,))[0]
    return int(slopes.argmin())


def check_range(start: float, end: float, steps: int) -> None:
    """The test's own settings (callers check them before building anything): 0 < start < end, and
    at least 3 steps; a SettingError names "start/end" or "steps"."""
    if not 0 < start < end:
        raise SettingError("start/end", f"expected 0 < start < end; found start {start}, end {end}")
    if steps < 3:
        raise SettingError("steps", f"expected at least 3 steps; found {steps}")


def range_test(trainer: Any, loader: Any, start: float = 1e-7, end: float = 10.0, steps: int = 100,
               beta: float = 0.98, diverge: float = 4.0) -> RangeTest:
    """Run the test on `trainer`'s parts over batches of `loader`; everything is restored afterwards."""
    check_range(start, end, steps)
    trainer.setup()
    model, optimizer = trainer.raw_model, trainer.optimizer
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
             trainer.stepper.state_dict(), rng_state())
    try:
        return _run(trainer, loader, start, end, steps, beta, diverge)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        trainer.stepper.load_state_dict(saved[2])
        set_rng_state(saved[3])


def _batches(loader: Any):
    epoch = 0
    while True:
        set_loader_epoch(loader, epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise TrainingError("lr-find: the training loader has no batches")
        epoch += 1


def _run(trainer: Any, loader: Any, start: float, end: float, steps: int, beta: float,
         diverge: float) -> RangeTest:
    model, stepper, task = trainer.placement.train_model, trainer.stepper, trainer.task
    groups = trainer.optimizer.param_groups
    top = max(g["lr"] for g in groups) or 1.0
    ratios = [g["lr"] / top if top else 1.0 for g in groups]
    result, avg, best = RangeTest(), 0.0, math.inf
    model.train()
    batches = _batches(loader)
    for k in range(steps):
        lr = start * (end / start) ** (k / (steps - 1))
        for g, r in zip(groups, ratios):
            g["lr"] = lr * r
        batch = trainer.placement.to_device(next(batches))
        with stepper.autocast():
            outputs, targets = task.forward(model, batch)
            loss = task.loss(trainer.loss_fn, outputs, targets)
        value = float(loss.detach())
        if not math.isfinite(value):
            result.stop = f"the loss was not finite at step {k + 1} (LR {lr:.3g})"
            break
        stepper.backward(loss)
        stepper.step()
        avg = beta * avg + (1 - beta) * value
        smooth = avg / (1 - beta ** (k + 1))
        result.lrs.append(lr)
        result.losses.append(value)
        result.smoothed.append(smooth)
        best = min(best, smooth)
        if smooth > diverge * best:
            result.stop = f"diverged at step {k + 1} (LR {lr:.3g}): the smoothed loss passed {diverge:g}x its minimum"
            break
    result.valley = valley(result.smoothed)
    result.steepest = steepest(result.lrs, result.smoothed)
    return result

