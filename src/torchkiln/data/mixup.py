"""Mixup and CutMix on training batches (`data.mixup`), with torchvision.transforms.v2.

Each training batch, with probability `prob`, is mixed by MixUp (`mixup_alpha` > 0) or CutMix
(`cutmix_alpha` > 0), one of the two at random when both are on; its targets become soft (N, C)
class probabilities, which the loss takes (CrossEntropyLoss accepts them). A batch left unmixed
gets one-hot targets, so every batch has the same form. Train metrics (accuracy, F1, ...) are
computed on each sample's dominant label: the class with the largest share of its soft target
(tasks/base.py:ClassificationTask.update_metrics); validation and test are never mixed.

The draws come from torch's global RNG in the training process, batch by batch, so a checkpoint's
RNG state resumes them exactly. CutMix needs image batches (N, C, H, W); MixUp needs 4-D inputs in
torchvision too: flat feature vectors are refused when the loaders are built.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from torchkiln.errors import ConfigError, first_line


class BatchMixer:
    """(inputs, int labels) -> (mixed inputs, soft targets (N, C))."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0):
        from torchvision.transforms import v2

        if num_classes is None or num_classes < 2:
            raise ConfigError("data.mixup: needs a classification data set with a known class count (>= 2)")
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ConfigError("data.mixup: set mixup_alpha or cutmix_alpha above 0 (or leave data.mixup out)")
        choices = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else [])
        choices += [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else []
        self.mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.num_classes, self.prob = int(num_classes), float(prob)

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prob >= 1.0 or float(torch.rand(())) < self.prob:
            return self.mix(inputs, labels.long())
        return inputs, torch.nn.functional.one_hot(labels.long(), self.num_classes).to(inputs.dtype)

    def batch(self, batch: Any) -> Any:
        """A loader's batch ([inputs, targets, ...] or {input, target}) mixed."""
        if isinstance(batch, dict):
            inputs, targets = self(batch["input"], batch["target"])
            return {**batch, "input": inputs, "target": targets}
        inputs, targets = self(batch[0], batch[1])
        return [inputs, targets, *batch[2:]]

    def check(self, sample_batch: Any) -> None:
        """Refuse, before the run, a batch torchvision cannot mix (flat features, non-class targets)."""
        if sample_batch is None:
            return
        try:
            self.mix(*_inputs_and_labels(sample_batch))
        except (ValueError, TypeError, RuntimeError) as exc:
            first = first_line(exc) or type(exc).__name__
            raise ConfigError(f"data.mixup: the training batches cannot be mixed ({first}); MixUp and CutMix"
                              " need image batches (N, C, H, W) and integer class targets") from exc


def _inputs_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["input"], batch["target"].long()
    return batch[0], batch[1].long()


class MixedBatches:
    """A training loader whose batches are mixed as they are drawn. It shows the loader's own
    `batch_sampler`, `generator` and `dataset`, so epochs, mid-epoch resume and accumulation's
    batch sizes work as on the loader itself (data/loaders.py)."""

    def __init__(self, loader: Any, mixer: BatchMixer):
        self.loader, self.mixer = loader, mixer

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def batch_sampler(self) -> Any:
        return getattr(self.loader, "batch_sampler", None)

    @property
    def generator(self) -> Any:
        return getattr(self.loader, "generator", None)

    @property
    def collate_fn(self) -> Any:
        """The loader's collate, then the mix: what the probe (probe.py) puts through the model and loss."""
        from torch.utils.data import default_collate

        inner = getattr(self.loader, "collate_fn", None) or default_collate
        return lambda samples: self.mixer.batch(inner(samples))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield self.mixer.batch(batch)


def with_mixup(loader: Any, spec: Any, num_classes: int | None) -> MixedBatches:
    """`loader` mixed per `data.mixup` (checked on its first two samples now)."""
    from torchkiln.probe import first_samples

    mixer = BatchMixer(num_classes, spec.mixup_alpha, spec.cutmix_alpha, spec.prob)
    state = torch.get_rng_state()
    try:
        mixer.check(first_samples(loader))
    finally:
        torch.set_rng_state(state)  # the check draws nothing the run depends on
    return MixedBatches(loader, mixer)
