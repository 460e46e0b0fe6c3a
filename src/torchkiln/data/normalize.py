"""`data.normalize`: standardize input features (and regression targets) with the training split's
mean and std. Fitted once on the training split; the statistics are plain data stored in the run
(`normalization.json`) and in its checkpoints, so `kiln test` applies the same ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from torchkiln.errors import DataError


@dataclass
class Standardization:
    """Mean and std per feature (shaped like one sample's input) and per regression target."""

    features: tuple[torch.Tensor, torch.Tensor] | None = None
    targets: tuple[torch.Tensor, torch.Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {name: None if pair is None else {"mean": pair[0].tolist(), "std": pair[1].tolist()}
                for name, pair in (("features", self.features), ("targets", self.targets))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Standardization:
        def pair(part: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
            if part is None:
                return None
            return (torch.tensor(part["mean"], dtype=torch.float32), torch.tensor(part["std"], dtype=torch.float32))

        return cls(pair(data.get("features")), pair(data.get("targets")))


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position over the samples (dim 0), in float64; a constant feature keeps std 1."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, correction=0)
    std = torch.where(std > 1e-12 * mean.abs().clamp(min=1.0), std, torch.ones_like(std))
    return mean.float(), std.float()


def sample_columns(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All inputs and targets of a (Subset of a) dataset, stacked: from its in-memory tensors when
    it has them, else read sample by sample."""
    from torchkiln.data.loaders import fast_source

    source = fast_source(dataset)
    if source is not None:
        tensors, index = source
        picked = [t if index is None else t[index] for t in tensors]
        return picked[0], picked[1] if len(picked) > 1 else None
    xs, ys = [], []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        sample = dataset[i]
        if isinstance(sample, dict):
            xs.append(torch.as_tensor(sample["input"]))
            if "target" in sample:
                ys.append(torch.as_tensor(sample["target"]))
        elif isinstance(sample, (tuple, list)):
            xs.append(torch.as_tensor(sample[0]))
            if len(sample) > 1:
                ys.append(torch.as_tensor(sample[1]))
        else:
            xs.append(torch.as_tensor(sample))
    if not xs:
        raise DataError("data.normalize: the training split is empty")
    return torch.stack(xs), torch.stack(ys) if len(ys) == len(xs) else None


def fit(train: Dataset, features: bool, targets: bool) -> Standardization:
    """Statistics of the training split: features always numeric; targets only when asked (regression)."""
    x, y = sample_columns(train)
    out = Standardization()
    if features:
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
            raise DataError(f"data.normalize.features: inputs of dtype {x.dtype} cannot be standardized")
        out.features = _mean_std(x)
    if targets:
        if y is None or not y.is_floating_point():
            raise DataError("data.normalize.targets: the regression targets must be float numbers; found "
                            f"{'none' if y is None else y.dtype} (set data.normalize.targets: false)")
        out.targets = _mean_std(y)
    return out


class Standardized(Dataset):
    """A dataset whose samples' inputs are (input - mean) / std, as float32."""

    def __init__(self, dataset: Dataset, mean: torch.Tensor, std: torch.Tensor):
        self.dataset = dataset
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def standardize(self, x: Any, batched: bool = False) -> torch.Tensor:
        """One sample's input (or, `batched`, a stack of them) standardized."""
        x = torch.as_tensor(x)
        if (x.shape[1:] if batched else x.shape) != self.mean.shape:
            raise DataError(f"data.normalize: an input of shape {tuple(x.shape[int(batched):])} does not match"
                            f" the training split's features {tuple(self.mean.shape)}")
        return (x.float() - self.mean) / self.std

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        if isinstance(sample, dict):
            return {**sample, "input": self.standardize(sample["input"])}
        if isinstance(sample, (tuple, list)):
            return type(sample)([self.standardize(sample[0]), *sample[1:]])
        return self.standardize(sample)


class StandardizedTensors(Standardized):
    """Standardized over an in-memory tensor dataset: the fast path slices the standardized copy."""

    def __init__(self, dataset: Dataset, mean: torch.Tensor, std: torch.Tensor):
        super().__init__(dataset, mean, std)
        self._tensors: tuple[torch.Tensor, ...] | None = None

    def fast_tensors(self) -> tuple[torch.Tensor, ...]:
        if self._tensors is None:
            first, *rest = self.dataset.fast_tensors()  # type: ignore[attr-defined]
            self._tensors = (self.standardize(first, batched=True), *rest)
        return self._tensors


def standardized(dataset: Dataset, stats: Standardization) -> Dataset:
    """`dataset` with standardized inputs (as is without feature statistics)."""
    if stats.features is None:
        return dataset
    cls = StandardizedTensors if hasattr(dataset, "fast_tensors") else Standardized
    return cls(dataset, *stats.features)


def standardize_splits(base: Dataset, splits: list[Dataset | None], stats: Standardization) -> list[Dataset | None]:
    """Standardize every split: Subsets of `base` share one standardized `base` (one copy of the data)."""
    wrapped = standardized(base, stats)
    out: list[Dataset | None] = []
    for ds in splits:
        if ds is None:
            out.append(None)
        elif isinstance(ds, Subset) and ds.dataset is base:
            out.append(Subset(wrapped, ds.indices))
        else:
            out.append(standardized(ds, stats))
    return out
