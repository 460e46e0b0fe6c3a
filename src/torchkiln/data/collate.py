"""Named collate functions (`data.collate`): the default, and padding of variable-length sequences."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.utils.data import default_collate

from torchkiln.errors import ConfigError, DataError
from torchkiln.registry import Registry

COLLATES = Registry("collate")


def same_size(batch: list[Any], fix: str, names: list[str] | None = None) -> Any:
    """torch's default_collate; samples that differ in size are one DataError saying `fix`. With
    `names` (one per sample, the samples tensors) it names the first sample whose size differs."""
    try:
        return default_collate(batch)
    except RuntimeError as exc:
        if "stack expects each tensor to be equal size" not in str(exc):
            raise
        odd = next((i for i, x in enumerate(batch) if x.shape != batch[0].shape), None) if names else None
        what = str(exc) if odd is None else (f"{names[odd]} is {_hw(batch[odd])}, {names[0]}"
                                             f" {_hw(batch[0])}")
        raise DataError(f"samples in a batch differ in size ({what}); {fix}") from exc


def _hw(x: torch.Tensor) -> str:
    return "x".join(map(str, x.shape[-2:])) + " (H x W)" if x.dim() >= 2 else str(tuple(x.shape))


@COLLATES.register(name="default")
class DefaultCollate:
    """torch's default_collate, with a clear message when samples differ in size."""

    def __call__(self, batch: list[Any]) -> Any:
        return same_size(batch, "add a Resize/CenterCrop to data.transforms, or use data.collate: pad_sequences")


@COLLATES.register(name="pad_sequences")
class PadSequences:
    """Pad every variable-length tensor field along dim 0 to the batch's longest.

    Samples are tuples `(sequence (L, ...), target, ...)`; the batch is
    `[padded inputs (B, Lmax, ...), targets, ..., lengths (B,)]` (lengths of the first field). A
    target that is itself a sequence is padded with `target_padding_value` (-100: ignored by
    CrossEntropyLoss). Fields of equal shape are stacked as usual.
    """

    def __init__(self, padding_value: float = 0.0, target_padding_value: float = -100):
        self.padding_value = padding_value
        self.target_padding_value = target_padding_value

    def __call__(self, batch: list[Any]) -> list[Any]:
        if not batch or not isinstance(batch[0], (tuple, list)):
            batch = [(s,) for s in batch]
        out = []
        for i, field in enumerate(zip(*batch)):
            out.append(self._pad(list(field), self.padding_value if i == 0 else self.target_padding_value))
        first = batch[0][0]
        lengths = [len(s[0]) for s in batch] if isinstance(first, torch.Tensor) and first.dim() else [1] * len(batch)
        out.append(torch.as_tensor(lengths, dtype=torch.int64))
        return out

    @staticmethod
    def _pad(items: list[Any], value: float) -> Any:
        if not isinstance(items[0], torch.Tensor) or items[0].dim() == 0:
            return default_collate(items)
        if len({t.shape for t in items}) == 1:
            return torch.stack(items)
        return torch.nn.utils.rnn.pad_sequence(items, batch_first=True, padding_value=value)


def build_collate(spec: Any, where: str = "data.collate") -> Any:
    """A collate callable from `{type, args}`: a registered name, or an import path.

    An import path names either a collate function (used as is when there are no args) or a
    class/factory called with `args` to make one.
    """
    if spec is None:
        return DefaultCollate()
    obj = COLLATES.get(spec.type, f"{where}.type")
    args = dict(spec.args)
    if ":" in spec.type and not args and not inspect.isclass(obj):
        return obj
    try:
        return obj(**args)
    except TypeError as exc:
        raise ConfigError(f"{where}: could not build collate '{spec.type}': {exc}") from exc
