"""Before a run is made: two training samples go through the model and the loss once, so that a
model that does not fit the data (in_features, in_channels, the class count) or a loss that does
not fit the task ends in one line at config time, not in a traceback after the run started.

Nothing the run depends on changes: the model is put in eval mode under no_grad (no BatchNorm
statistics move), every RNG's state is put back, and the samples are read straight from the
dataset (no loader workers are started, no sampler position moves).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from torchkiln.errors import ConfigError, KilnError, first_line

log = logging.getLogger("torchkiln")


def first_samples(loader: Any, n: int = 2) -> Any | None:
    """A batch of the first `n` samples of the loader's dataset, on the CPU, as the loader makes it."""
    from torchkiln.data.loaders import FastLoader
    from torchkiln.engine.device import move_to

    if isinstance(loader, FastLoader):
        idx = torch.arange(min(n, len(loader.dataset)), device=loader.tensors[0].device)
        if loader.index is not None:
            idx = loader.index[idx]
        return [t.index_select(0, idx).cpu() for t in loader.tensors]
    dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
    if dataset is None or collate is None or not hasattr(dataset, "__getitem__"):
        return None
    count = min(n, len(dataset))
    if count == 0:
        return None
    return move_to(collate([dataset[i] for i in range(count)]), torch.device("cpu"))


def probe(model: torch.nn.Module, loss_fn: torch.nn.Module, task: Any, loader: Any) -> Any | None:
    """Raise a ConfigError naming what failed when one small batch does not go through; return
    the batch's inputs (None when the loader's samples could not be read apart from it)."""
    from torchkiln.seeding import rng_state, set_rng_state

    state, training = rng_state(), model.training
    key, part = "data", "the data's transforms and collate"
    try:
        batch = first_samples(loader)
        if batch is None:
            return None
        key, part = "model", "the model"
        model.eval()
        with torch.no_grad():
            outputs, targets = task.forward(model, batch)
            key, part = "loss", "the loss"
            if targets is not None:
                task.loss(loss_fn, outputs, targets)
                _check_log_probabilities(loss_fn, outputs)
        return task.split_batch(batch)[0]
    except KilnError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the model or loss raised, named in one line
        text = first_line(exc) or type(exc).__name__
        hint = {"data": "check data.transforms (and data.collate)",
                "model": "check that model.args fit the data (input size, channels, classes)",
                "loss": f"check that the loss fits task {getattr(task, 'name', '?')} and its targets"}[key]
        raise ConfigError(
            f"{key}: one batch of the training data does not go through {part} ({type(exc).__name__}: {text});"
            f" {hint}"
        ) from exc
    finally:
        model.train(training)
        set_rng_state(state)


def _check_log_probabilities(loss_fn: torch.nn.Module, outputs: Any) -> None:
    """NLLLoss takes log-probabilities; on a model's raw scores (logits) it trains toward -inf (a
    negative loss), a classic slip of configs ported from templates whose models ended in log_softmax."""
    if type(loss_fn) is not torch.nn.NLLLoss or not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
        return
    totals = outputs.float().exp().sum(1)
    if not torch.allclose(totals, torch.ones_like(totals), atol=1e-3):
        log.warning("loss: NLLLoss expects log-probabilities, but the model's outputs are not (their exp does"
                    " not sum to 1 per sample): use CrossEntropyLoss for raw scores, or end the model in log_softmax")
