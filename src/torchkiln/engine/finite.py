"""The non-finite-loss rule: stop the run (weights after a non-finite loss are never saved), or
skip the batch. On an accelerator the `stop` check is deferred: the losses stay on the device and
are checked with one sync per log interval and before anything is saved or validated, instead of
a sync every step."""

from __future__ import annotations

import logging
import math

import torch

from torchkiln.engine import distributed
from torchkiln.errors import SettingError, TrainingError

POLICIES = ("stop", "skip_batch")
log = logging.getLogger("torchkiln")


class FiniteCheck:
    def __init__(self, policy: str = "stop", defer: bool | None = None):
        if policy not in POLICIES:
            raise SettingError("on_nonfinite", f"expected stop or skip_batch; found {policy!r}")
        self.policy = policy
        self.defer = defer  # None: defer off the CPU
        self._active = True  # False under the fp16 GradScaler (start_epoch)
        self._deferring = False
        self._device = torch.device("cpu")
        self._pending: list[tuple[int, int, int, torch.Tensor]] = []

    def start_epoch(self, device: torch.device, scaled: bool) -> None:
        """`scaled`: the fp16 GradScaler checks the gradients itself, so no loss check is needed."""
        self._device = device
        self._active = not scaled
        defer = self.defer if self.defer is not None else device.type != "cpu"
        self._deferring = defer and self._active and self.policy == "stop"

    def usable(self, loss: torch.Tensor, epoch: int, step: int, batch: int) -> bool:
        """Whether this micro-batch's loss may be backpropagated (raises under `stop`)."""
        if not self._active:
            return True
        if self._deferring:
            self._pending.append((epoch, step, batch, loss.detach()))
            return True
        finite = math.isfinite(loss.item())
        if self.policy == "skip_batch" and distributed.is_distributed():
            # a rank that skipped its backward alone would leave the others waiting in DDP's
            # all-reduce, so the ranks agree (one all-reduce) and skip the batch together
            finite = distributed.all_ranks(finite, self._device)
        if not finite and self.policy == "stop":
            raise nonfinite_error(loss.item(), epoch, step, batch)
        if not finite:
            log.warning("skipped batch %d of epoch %d: non-finite loss %s (on this or another rank)",
                        batch + 1, epoch + 1, loss.item())
        return finite

    def flush(self) -> None:
        """The deferred check: one device sync for every loss kept since the last."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.stack([v.float() for *_, v in pending])
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return
        j = int((~finite).nonzero()[0])
        epoch, step, batch, _ = pending[j]
        raise nonfinite_error(values[j].item(), epoch, step, batch)


def nonfinite_error(value: float, epoch: int, step: int, batch: int) -> TrainingError:
    return TrainingError(
        f"non-finite loss ({value}) at epoch {epoch + 1}, step {step} (batch {batch + 1}); the run stopped"
        f" and its saved checkpoints are intact (set trainer.on_nonfinite: skip_batch to skip such batches)"
    )
