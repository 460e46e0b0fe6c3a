""""Does training work" checks (`trainer.checks: warn | strict | off`), in the first epoch, cheap.

- The loss is finite and moving: the losses of the first epoch's optimizer steps (at least 3; read
  from the device once, at the epoch's end) are all finite and not all the same, and the trainable
  parameters changed (their norms, kept on the device, differ from those at the start: a learning
  rate of 0 or an optimizer that holds none of the trainable parameters shows here).
- The optimizer holds every trainable parameter (checked when the first fit starts).
- Every trainable parameter received a gradient: after the first backward that reached any
  parameter, those with `requires_grad` and no gradient are named (unused parameters: the classic
  cause of DDP's "Expected to have finished reduction" error).
- Gradients are finite: every micro-batch of the first epoch, as one flag kept on the device and
  read at the epoch's end. Under fp16 the GradScaler owns that check (its first steps overflow by
  design while it finds its scale; each skipped step is logged), so it is left out there.
- The initial-parameter fingerprint is the same on every rank: checked when the process group
  starts (engine/distributed.py), not here.

A finding is a warning in the log and goes to `summary.json` (`checks`); `strict` raises it as a
TrainingError at once. Each process checks its own model; rank 0 reports.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from torchkiln.engine import distributed
from torchkiln.engine.callbacks import Callback, StepInfo
from torchkiln.errors import SettingError, TrainingError

log = logging.getLogger("torchkiln")
MODES = ("warn", "strict", "off")
MIN_STEPS = 3  # loss steps needed to call it moving


class TrainingChecks(Callback):
    """See the module's docstring."""

    def __init__(self, mode: str = "warn"):
        if mode not in MODES:
            raise SettingError("checks", f"expected one of {', '.join(MODES)}; found {mode!r}")
        self.mode = mode
        self.findings: list[str] = []
        self.passed: list[str] = []
        self.done = mode == "off"
        self._losses: list[torch.Tensor] = []
        self._grads_seen = False
        self._grads_finite: torch.Tensor | None = None
        self._check_grads = True
        self._params: list[torch.Tensor] = []
        self._norms: torch.Tensor | None = None  # the trainable parameters' norms at the start

    def on_fit_start(self, trainer: Any) -> None:
        self._check_grads = trainer.stepper.scaler is None
        if not self.done and trainer.loop.global_step == 0:
            self._params = [p for p in trainer.raw_model.parameters() if p.requires_grad]
            self._norms = _norms(self._params)
            self._check_optimizer_holds(trainer)

    def _check_optimizer_holds(self, trainer: Any) -> None:
        """Trainable parameters that the optimizer does not hold get gradients (which nothing
        clears: they pile up) and are never stepped."""
        held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        named = [(n, p) for n, p in trainer.raw_model.named_parameters() if p.requires_grad]
        left = [n for n, p in named if id(p) not in held]
        if left and len(left) < len(named):  # none held at all: the loss check at the epoch's end says it
            shown = ", ".join(left[:10]) + (f" and {len(left) - 10} more" if len(left) > 10 else "")
            self._find(f"{len(left)} trainable parameter(s) are not in the optimizer: {shown} (they get"
                       " gradients but never a step; add them to the optimizer, or freeze them with"
                       " requires_grad_(False))")
        elif named:
            self.passed.append("the optimizer holds every trainable parameter")

    def _find(self, text: str) -> None:
        self.findings.append(text)
        if distributed.is_rank0():
            log.warning("check: %s", text)
        if self.mode == "strict":
            raise TrainingError(f"trainer.checks: strict: {text}")

    def on_train_batch_end(self, trainer: Any, batch: int, samples: int) -> None:
        if self.done:
            return
        params = [(n, p) for n, p in trainer.raw_model.named_parameters() if p.requires_grad]
        grads = [p.grad for _, p in params if p.grad is not None]
        if not grads:  # nothing was backwarded (a skipped non-finite batch)
            return
        if not self._grads_seen:
            self._grads_seen = True
            unused = [n for n, p in params if p.grad is None]
            if unused:
                shown = ", ".join(unused[:10]) + (f" and {len(unused) - 10} more" if len(unused) > 10 else "")
                self._find(f"{len(unused)} trainable parameter(s) received no gradient: {shown} (unused in"
                           " forward, or detached: under DDP this is the 'unused parameters' error; freeze"
                           " them or use them)")
            else:
                self.passed.append(f"every trainable parameter ({len(params)}) received a gradient")
        if self._check_grads:
            finite = torch.stack(torch._foreach_norm(grads)).isfinite().all()
            self._grads_finite = finite if self._grads_finite is None else self._grads_finite & finite

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        if not self.done:
            self._losses.append(info.loss.detach().float().reshape(()))

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, float]) -> None:
        if self.done or len(self._losses) < MIN_STEPS and epoch + 1 < trainer.epochs:
            return  # one-step epochs (a tiny data set): the loss check waits for a few steps
        self.done = True
        losses = torch.stack(self._losses).cpu() if self._losses else torch.empty(0)
        self._losses = []
        bad = (~losses.isfinite()).nonzero().flatten().tolist()
        if bad:
            self._find(f"the loss was not finite at {len(bad)} of the first {len(losses)} steps (first: step"
                       f" {bad[0] + 1}); lower the LR, clip gradients (trainer.grad_clip) or check the data")
        elif len(losses) >= 2 and float(losses.max() - losses.min()) <= 1e-7 * max(1.0, float(losses.abs().mean())):
            self._find(f"the loss did not change over the first {len(losses)} steps ({float(losses[0]):.6g}):"
                       " a learning rate of 0, every parameter frozen, or outputs detached from the graph")
        elif self._norms is not None and torch.equal(self._norms, _norms(self._params)):
            self._find(f"no trainable parameter changed in the first {len(losses)} steps: a learning rate of"
                       " 0, or an optimizer that does not hold the model's parameters")
        elif len(losses) >= 2:
            self.passed.append(f"the loss is finite and moving ({float(losses[0]):.4g} -> {float(losses[-1]):.4g}"
                               f" over {len(losses)} steps)")
        if self._check_grads and self._grads_finite is not None:
            if not bool(self._grads_finite):
                self._find("non-finite gradients in the first epoch; lower the LR, clip gradients"
                           " (trainer.grad_clip) or look for a log/sqrt/division of 0 in the model or loss")
            else:
                self.passed.append("gradients are finite")
        self._grads_finite, self._params, self._norms = None, [], None

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        if self.mode != "off":
            summary["checks"] = {"mode": self.mode, "findings": list(self.findings), "passed": list(self.passed)}

    def state_dict(self) -> dict[str, Any]:
        losses = torch.stack(self._losses).cpu() if self._losses else None
        return {"findings": list(self.findings), "passed": list(self.passed), "done": self.done,
                "losses": losses, "grads_seen": self._grads_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.findings, self.passed = list(state.get("findings", [])), list(state.get("passed", []))
        self.done = bool(state.get("done", False)) or self.mode == "off"
        losses = state.get("losses")
        self._losses = list(losses.unbind()) if isinstance(losses, torch.Tensor) else []
        self._grads_seen = bool(state.get("grads_seen", False))


def _norms(params: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(torch._foreach_norm([p.detach() for p in params])) if params else None
