"""EMA of the weights (`trainer.ema`): validation, best.ckpt and inference use the averaged weights.

After every `every_n_steps`-th optimizer step that was taken, each floating-point entry of the
model's state_dict (parameters and BatchNorm statistics) moves towards the model's:
`ema <- decay_n * ema + (1 - decay_n) * w`, where n counts the updates and, with `warmup`,
`decay_n = min(decay, (1 + n) / (10 + n))` (the early updates follow the model closely, as in timm's
ModelEmaV2 warm-up); integer entries (BatchNorm's batch count) are copied.

Validation runs on the EMA weights (swapped in at `on_validation_start`, the training weights put
back at `on_validation_end`), so the monitored number, best.ckpt and early stopping follow them.
Every checkpoint holds the EMA weights twice over, at no cost in size (the same tensors): in the
callback's state (resume continues the average exactly) and as `state["averaged"]`, the weights
`engine/checkpoint.py:model_weights` gives `kiln test`, `kiln export`, `kiln predict` and
`model.pretrained`. `state["model"]` stays the training weights.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from torchkiln.engine.callbacks import Callback, StepInfo
from torchkiln.engine.checkpoint import AVERAGED
from torchkiln.errors import SettingError

log = logging.getLogger("torchkiln")


def put_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy `weights` into `model` in place (every wrapper of it sees them); returns what was there."""
    current = model.state_dict()
    backup = {k: v.detach().clone() for k, v in current.items()}
    with torch.no_grad():
        for k, v in weights.items():
            current[k].copy_(v)
    return backup


class EMA(Callback):
    """Exponential moving average of the weights; see the module's docstring."""

    def __init__(self, decay: float = 0.999, warmup: bool = True, every_n_steps: int = 1):
        if not 0.0 < float(decay) < 1.0:
            raise SettingError("ema.decay", f"expected a number between 0 and 1; found {decay}")
        if int(every_n_steps) < 1:
            raise SettingError("ema.every_n_steps", f"expected at least 1; found {every_n_steps}")
        self.decay, self.warmup, self.every_n_steps = float(decay), bool(warmup), int(every_n_steps)
        self.weights: dict[str, torch.Tensor] | None = None  # the average, keyed like the model's state_dict
        self.updates = 0
        self._training: dict[str, torch.Tensor] | None = None  # the training weights during validation

    def decay_at(self, update: int) -> float:
        """The decay of the `update`-th update (1-based)."""
        return min(self.decay, (1 + update) / (10 + update)) if self.warmup else self.decay

    def on_fit_start(self, trainer: Any) -> None:
        current = trainer.raw_model.state_dict()
        if self.weights is None or self.weights.keys() != current.keys():
            self.weights, self.updates = {k: v.detach().clone() for k, v in current.items()}, 0
        else:  # resumed: the average goes where the model is
            self.weights = {k: v.to(current[k].device) for k, v in self.weights.items()}
        log.info("EMA of the weights (decay %g%s, every %d step(s)): validation, best.ckpt and inference"
                 " use the EMA weights", self.decay, ", warm-up" if self.warmup else "", self.every_n_steps)

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        if info.stepped and info.step % self.every_n_steps == 0:
            self.update(trainer.raw_model)

    def update(self, model: nn.Module) -> None:
        """One EMA update from `model`'s current weights."""
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        current = model.state_dict()
        floats = [k for k, v in self.weights.items() if v.is_floating_point()]
        with torch.no_grad():
            if floats:
                torch._foreach_lerp_([self.weights[k] for k in floats], [current[k].detach() for k in floats],
                                     weight)
            for k, v in self.weights.items():
                if not v.is_floating_point():
                    v.copy_(current[k])

    def on_validation_start(self, trainer: Any, epoch: int) -> None:
        self._training = put_weights(trainer.raw_model, self.weights)

    def on_validation_end(self, trainer: Any, epoch: int, record: dict[str, float], samples: list) -> None:
        if self._training is not None:
            put_weights(trainer.raw_model, self._training)
            self._training = None

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self.on_validation_end(trainer, -1, {}, [])  # a failure inside validation: the training weights back

    def on_save_checkpoint(self, trainer: Any, state: dict[str, Any]) -> None:
        if self.weights is not None:
            state[AVERAGED] = {"kind": "ema", "weights": self.weights, "updates": self.updates, "decay": self.decay}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights, self.updates = state.get("weights"), int(state.get("updates", 0))
