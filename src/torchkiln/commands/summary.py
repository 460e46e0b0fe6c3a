"""`kiln summary`: the configured model's layers, output shapes, parameters, MACs and memory (torchinfo)."""

from __future__ import annotations

import argparse
import re
from typing import Any

from torchkiln.commands.logs import console
from torchkiln.config.schema import Config
from torchkiln.errors import ConfigError, DataError


def main(args: argparse.Namespace) -> int:
    """Print the model's table and totals."""
    from torchkiln.config.load import load_config

    console(quiet=True)
    print(model_summary(load_config(args.config, args.overrides), args.batch_size, args.depth))
    return 0


def sample_input(task: Any, data: Any, batch_size: int) -> Any:
    """A batch of `batch_size` copies of the first training sample's input, as the model sees it."""
    import torch
    from torch.utils.data import default_collate

    if len(data.train) == 0:
        raise DataError("data.dataset: the training split is empty; nothing to size the model's input from")
    batch = default_collate([data.train[0]])
    inputs, _ = task.split_batch(batch)
    if not isinstance(inputs, torch.Tensor):
        raise DataError("kiln summary: the model's input is not a single tensor; summarise it from Python")
    return inputs.expand(batch_size, *inputs.shape[1:]).contiguous()


def model_summary(cfg: Config, batch_size: int | None = None, depth: int = 3) -> str:
    """The table and totals for the model of `cfg`, at the input size of its data."""
    try:
        import torchinfo
    except ImportError as exc:  # a core dependency, but say what to do if it is gone
        raise ConfigError("kiln summary needs torchinfo: pip install torchinfo") from exc
    from torchkiln.config.build import (
        build_data,
        build_freezer,
        build_model,
        check_components,
        num_classes_of,
    )
    from torchkiln.seeding import seed_everything
    from torchkiln.tasks import build_task

    check_components(cfg)
    seed_everything(cfg.seed)
    data = build_data(cfg)
    task = build_task(cfg.task)
    model = build_model(cfg, task.num_outputs(num_classes_of(cfg, data)))  # the width training builds
    freezer = build_freezer(cfg, model)
    bs = batch_size or (cfg.data.batch_size if cfg.data.batch_size != "auto" else 1)  # auto: kiln train finds it
    x = sample_input(task, data, bs)
    stats = torchinfo.summary(model, input_data=[x], depth=depth, mode="eval", verbose=0, device="cpu",
                              col_names=("output_size", "num_params", "trainable"))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mb = 1e-6
    memory = stats.total_input + stats.total_output_bytes + stats.total_param_bytes
    table = re.sub(r"\(Units\.(\w)\w*\)", r"(\1)", str(stats))  # torchinfo 1.8 prints enum reprs on py3.11+
    lines = [
        f"model {cfg.model.type}, input {tuple(x.shape)} ({x.dtype}; batch {bs}, from one sample of"
        f" data.dataset)",
        table,
        f"parameters: {total:,} total, {trainable:,} trainable, {total - trainable:,} frozen",
        f"MACs: {stats.total_mult_adds / 1e6:,.1f} M per batch of {bs}",
        f"estimated memory: {memory * mb:,.1f} MB (input {stats.total_input * mb:,.2f},"
        f" forward/backward {stats.total_output_bytes * mb:,.2f}, parameters {stats.total_param_bytes * mb:,.2f})",
    ]
    if freezer is not None:
        lines.append(f"frozen: {freezer.describe()}")
    return "\n".join(lines)
