"""The batch-size finder: the largest batch whose training step fits the device's memory.

`power` doubles the batch until a step runs out of memory and answers the last size that fit;
`binsearch` then bisects between that size and the first that did not. Each try is a real step
on the Trainer's own parts: forward, backward (`accumulate` micro-batches) and the optimizer step,
in its precision, memory format and compiled model. `torch.OutOfMemoryError` is caught by its type;
memory is freed outside the `except` block between tries. A margin (10% by default) is kept off
the answer, and the model, optimizer and scaler state (and the RNG) are restored afterwards.

Under DDP each rank searches on its own (the tries run on the module inside DDP, with no
collective), then every rank takes the smallest answer. Where nothing runs out (a CPU), the search
stops at its bound: `max_size`, or the samples one process sees, and says so.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from torchkiln.engine import distributed
from torchkiln.engine.memory import MARGIN, SavedActivations, StepMemory, free_memory, mb
from torchkiln.engine.oom import forward_backward
from torchkiln.errors import SettingError, TrainingError

if TYPE_CHECKING:
    from torchkiln.engine.trainer import Trainer

log = logging.getLogger("torchkiln")
MODES = ("power", "binsearch")


@dataclass
class Trial:
    size: int
    fits: bool
    peak: int | None = None  # bytes: the CUDA allocator's peak, else the step's estimate
    measured: str = ""  # how `peak` was measured

    def line(self) -> str:
        if not self.fits:
            return f"batch {self.size:>6}: out of memory"
        return f"batch {self.size:>6}: fits, peak {mb(self.peak)} ({self.measured})"


@dataclass
class FinderResult:
    size: int  # the answer: the largest size that fit, less the margin
    largest: int  # the largest size that fit
    mode: str
    margin: float
    trials: list[Trial] = field(default_factory=list)
    bound: str | None = None  # why the search stopped without running out (None: it ran out)

    def lines(self) -> list[str]:
        out = [t.line() for t in self.trials]
        if self.bound is not None:
            out.append(f"{self.mode}: nothing ran out of memory up to {self.largest}, {self.bound};"
                       f" answer {self.size}")
        else:
            out.append(f"{self.mode}: the largest batch that fits is {self.largest}; with a"
                       f" {self.margin:.0%} margin: {self.size}")
        return out


def check_search(mode: str, margin: float) -> None:
    """The search's own settings (callers check them before building anything); a SettingError
    names "mode" or "margin"."""
    if mode not in MODES:
        raise SettingError("mode", f"expected power or binsearch; found {mode!r}")
    if not 0 <= margin < 1:
        raise SettingError("margin", f"expected a fraction in [0, 1); found {margin}")


def search(fits: Callable[[int], Trial], mode: str = "binsearch", start: int = 2, max_size: int = 65536,
           margin: float = MARGIN, bound_reason: str | None = None) -> FinderResult:
    """The search alone: `fits(size)` tries one size. Doubling from `start`, then (binsearch)
    bisection between the last size that fit and the first that did not."""
    check_search(mode, margin)
    start = max(1, min(int(start), int(max_size)))
    trials: list[Trial] = []

    def attempt(size: int) -> bool:
        trials.append(fits(size))
        return trials[-1].fits

    size, good, bad = start, None, None
    while True:
        if not attempt(size):
            bad = size
            break
        good = size
        if size >= max_size:
            break
        size = min(size * 2, max_size)
    if good is None:
        raise TrainingError(f"even a batch of {start} runs out of memory: try trainer.precision=bf16,"
                            " trainer.activation_checkpointing=[NAMES] or a smaller model")
    if mode == "binsearch" and bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            if attempt(mid):
                good = mid
            else:
                bad = mid
    if bad is None:  # the bound, not the memory, ended it: no margin needed
        return FinderResult(good, good, mode, margin, trials, bound_reason or f"the bound {max_size}")
    return FinderResult(max(1, math.floor(good * (1 - margin))), good, mode, margin, trials)


class StepTrial:
    """Tries one batch size with a real training step of `trainer` (batches from `batch_of(size)`)."""

    def __init__(self, trainer: Trainer, batch_of: Callable[[int], Any]):
        self.trainer, self.batch_of = trainer, batch_of

    def __call__(self, size: int) -> Trial:
        t = self.trainer
        cuda = t.device.type == "cuda"
        ran_out = False
        if cuda:
            torch.cuda.reset_peak_memory_stats(t.device)
        try:
            measured = self._step(size)
        except torch.OutOfMemoryError:
            ran_out = True
        t.optimizer.zero_grad(set_to_none=True)
        free_memory()  # outside the except block: the failed try's tensors are gone with its traceback
        if ran_out:
            return Trial(size, False)
        if cuda:
            return Trial(size, True, torch.cuda.max_memory_allocated(t.device), "CUDA peak allocated")
        return Trial(size, True, measured.total, "estimate: parameters, gradients, optimizer state, activations")

    def _step(self, size: int) -> StepMemory:
        t = self.trainer
        batch = t.placement.to_device(self.batch_of(size))
        model = distributed.unwrap_ddp(t.placement.train_model)  # no collective: ranks search alone
        model.train()
        k = t.stepper.accumulate
        saved = SavedActivations(model) if not t.placement.compile else contextlib.nullcontext()
        with saved:
            forward_backward(t, model, batch, 1.0 / k, last=False)
        for _ in range(k - 1):
            forward_backward(t, model, batch, 1.0 / k, last=False)
        t.stepper.step()
        activations = saved.bytes if isinstance(saved, SavedActivations) else 0
        return StepMemory.of(t.raw_model, t.optimizer, activations, size, t.stepper.precision)


def find_batch_size(trainer: Trainer, batch_of: Callable[[int], Any], samples: int, *, mode: str = "binsearch",
                    start: int = 2, max_size: int = 65536, margin: float = MARGIN) -> FinderResult:
    """The search with real steps of `trainer`; `samples`: what one process can put in a batch.
    The Trainer's model, optimizer, scaler and the RNG are as before afterwards."""
    from torchkiln.seeding import rng_state, set_rng_state

    trainer.setup()  # the placement: device, memory format, compile (as training will run)
    saved = _snapshot(trainer)
    rng = rng_state()
    bound = min(max_size, samples)
    reason = (f"the samples one process has ({samples})" if samples <= max_size else f"--max {max_size}")
    try:
        result = search(StepTrial(trainer, batch_of), mode, start, bound, margin, reason)
    finally:
        _restore(trainer, saved)
        set_rng_state(rng)
    agreed = min(distributed.gather_objects(result.size))  # every rank takes the smallest answer
    if agreed != result.size:
        log.info("batch-size finder: another rank fits only %d; every rank uses %d", agreed, agreed)
        result.size = agreed
    return result


def _snapshot(trainer: Trainer) -> dict[str, Any]:
    """Copies on the CPU (not beside the weights on the device the search is filling)."""
    def cpu(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.detach().to("cpu", copy=True)
        if isinstance(obj, dict):
            return {k: cpu(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [cpu(v) for v in obj]
        return copy.deepcopy(obj)

    return {"model": cpu(trainer.raw_model.state_dict()), "optimizer": cpu(trainer.optimizer.state_dict()),
            "step": cpu(trainer.stepper.state_dict())}


def _restore(trainer: Trainer, saved: dict[str, Any]) -> None:
    from torchkiln.engine.placement import move_optimizer_state

    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.raw_model.load_state_dict(saved["model"])
    trainer.optimizer.load_state_dict(saved["optimizer"])
    move_optimizer_state(trainer.optimizer, trainer.device)
    trainer.stepper.load_state_dict(saved["step"])
    free_memory()
