"""Freezing: which parameters train at each epoch, and frozen norm layers that stay in eval mode.

All parameters stay in the optimizer; a frozen one has `requires_grad=False`, so it gets no
gradient and the optimizer skips it (no momentum, no weight decay). Which parameters are frozen is
a pure function of the epoch (`set_epoch`), so a resumed run is in the same state as one that
never stopped. A frozen BatchNorm ignores `train(True)`: its running statistics do not move.
"""

from __future__ import annotations

import fnmatch
import logging
import types
from collections.abc import Sequence

from torch import nn

from torchkiln.errors import ConfigError, did_you_mean
from torchkiln.models.heads import find_head, in_head

log = logging.getLogger("torchkiln")

_STATEFUL_NORMS = (nn.modules.batchnorm._BatchNorm,)  # norms whose train mode changes their state


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """`train()` of a frozen norm layer: it stays in eval mode."""
    return nn.Module.train(self, False)


class Freezer:
    """Freezes `names` (parameter names) until epoch `unfreeze_at_epoch` (1-based; None: for good)."""

    def __init__(self, model: nn.Module, names: Sequence[str], norms: Sequence[str],
                 unfreeze_at_epoch: int | None = None):
        self.model = model
        self.names = list(names)
        self.norms = list(norms)
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.frozen: bool | None = None  # unknown until the first set_epoch

    def frozen_at(self, epoch: int) -> bool:
        """Whether the frozen set is frozen during `epoch` (0-based, as the Trainer counts)."""
        return self.unfreeze_at_epoch is None or epoch + 1 < self.unfreeze_at_epoch

    def set_epoch(self, epoch: int) -> bool:
        """Put the model in the state of `epoch`; True when that changed anything."""
        frozen = self.frozen_at(epoch)
        if frozen == self.frozen:
            return False
        self.frozen = frozen
        params = dict(self.model.named_parameters())
        for name in self.names:
            params[name].requires_grad_(not frozen)
        modules = dict(self.model.named_modules())
        for name in self.norms:
            m = modules[name]
            if frozen:
                m.train = types.MethodType(_eval_only_train, m)
                m.train(False)
            else:
                m.__dict__.pop("train", None)
                m.train(self.model.training)
        return True

    def describe(self) -> str:
        until = f"until epoch {self.unfreeze_at_epoch}" if self.unfreeze_at_epoch else "for the whole run"
        state = "frozen" if self.frozen else "trainable"
        return (f"{len(self.names)} parameter tensors ({self.names[0]}, ...) {until}, now {state};"
                f" {len(self.norms)} norm layers kept in eval mode while frozen")

    def counts(self) -> tuple[int, int]:
        """(trainable, frozen) parameter counts now."""
        ps = list(self.model.parameters())
        trainable = sum(p.numel() for p in ps if p.requires_grad)
        return trainable, sum(p.numel() for p in ps) - trainable


def make_freezer(model: nn.Module, freeze: str | Sequence[str], unfreeze_at_epoch: int | None = None,
                 head: str | None = None) -> Freezer:
    """`freeze`: 'backbone' (everything outside the head) or glob patterns over parameter names.

    A norm layer is kept in eval mode when all its parameters are frozen (or, without parameters,
    when it lies in the frozen part: outside the head, or its buffers match a pattern).
    """
    if freeze == "backbone":
        head = find_head(model, head)

        def frozen(key: str) -> bool:
            return not in_head(key, head)
    else:
        patterns = [freeze] if isinstance(freeze, str) else list(freeze)
        names = [n for n, _ in model.named_parameters()]
        for i, pat in enumerate(patterns):
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise ConfigError(f"model.freeze.{i}: pattern '{pat}' matches no parameter"
                                  f"{did_you_mean(pat, names)} (e.g. 'features.*', 'layer1.*')")

        def frozen(key: str) -> bool:
            return any(fnmatch.fnmatchcase(key, p) for p in patterns)

    names = [n for n, _ in model.named_parameters() if frozen(n)]
    if not names:
        raise ConfigError("model.freeze: nothing to freeze (the whole model is its head)")
    norms = []
    for mname, m in model.named_modules():
        if not isinstance(m, _STATEFUL_NORMS):
            continue
        keys = [f"{mname}.{k}" for k, _ in m.named_parameters(recurse=False)] or \
            [f"{mname}.{k}" for k, _ in m.named_buffers(recurse=False)]
        if keys and all(frozen(k) for k in keys):
            norms.append(mname)
    return Freezer(model, names, norms, unfreeze_at_epoch)
