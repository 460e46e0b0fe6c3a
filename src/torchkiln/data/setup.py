"""Config -> datasets (split, transformed per split) and loaders (DataLoader or the fast path)."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from torchkiln.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("torchkiln")


def register_datasets() -> None:
    import torchkiln.data.digits  # noqa: F401
    import torchkiln.data.images  # noqa: F401
    import torchkiln.data.tensorfile  # noqa: F401


def build_dataset(comp: Any, where: str, data_cfg: Any) -> Dataset:
    """Build one dataset; `data.on_error` / `data.max_skipped` reach datasets that accept them."""
    from torchkiln.config.build import build
    from torchkiln.registry import DATASETS

    factory = DATASETS.get(comp.type, f"{where}.type")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {k: getattr(data_cfg, k) for k in ("on_error", "max_skipped") if k in params and k not in comp.args}
    return build(comp, DATASETS, where, **extra)


def decodes_images(dataset: Dataset) -> bool:
    while not getattr(dataset, "decodes_images", False) and isinstance(getattr(dataset, "dataset", None), Dataset):
        dataset = dataset.dataset  # type: ignore[attr-defined]
    return bool(getattr(dataset, "decodes_images", False))


def with_transforms(dataset: Dataset | None, steps: list, where: str) -> Dataset | None:
    """Wrap with the split's pipeline; decoded images always end as float32 in [0, 1]."""
    from torchkiln.data.transforms import Transformed, build_pipeline

    if dataset is None:
        return None
    pipeline = build_pipeline(steps, where, to_float=decodes_images(dataset))
    return dataset if pipeline is None else Transformed(dataset, pipeline)


def build_data(cfg: Any, data_cls: type) -> Any:
    from torchkiln.data.splits import split_dataset

    register_datasets()
    d = cfg.data
    dataset = build_dataset(d.dataset, "data.dataset", d)
    seed = d.split_seed if d.split_seed is not None else cfg.seed
    val_frac = 0.0 if d.val_dataset else d.val_split
    test_frac = 0.0 if d.test_dataset else d.test_split
    train, val, test = split_dataset(dataset, val_frac, test_frac, seed, stratify=d.stratify,
                                     folds=d.folds, fold=d.fold)
    skipped = list(getattr(dataset, "skipped", []))
    if d.val_dataset:
        val = build_dataset(d.val_dataset, "data.val_dataset", d)
        skipped += getattr(val, "skipped", [])
    if d.test_dataset:
        test = build_dataset(d.test_dataset, "data.test_dataset", d)
        skipped += getattr(test, "skipped", [])
    t = d.transforms
    return data_cls(
        with_transforms(train, t.train, "data.transforms.train"),
        with_transforms(val, t.eval, "data.transforms.eval"),
        with_transforms(test, t.eval, "data.transforms.eval"),
        getattr(dataset, "num_classes", None),
        getattr(dataset, "classes", None),
        skipped=skipped,
    )


def use_fast_path(cfg: Any, dataset: Dataset, device: Any) -> bool:
    """Fast when the data are in-memory tensors, no per-sample transform and no custom collate."""
    from torchkiln.data.loaders import fast_source

    d = cfg.data
    if d.fast_path is False:
        return False
    source = fast_source(dataset)
    possible = source is not None and d.collate is None
    if d.fast_path is True and not possible:
        raise ConfigError("data.fast_path: true needs an in-memory tensor dataset (Digits, TensorFile) without"
                          " transforms or a custom collate; use auto")
    if possible and d.fast_path == "auto" and device.type == "cuda":
        import torch

        size = sum(t.numel() * t.element_size() for t in source[0])
        free, _ = torch.cuda.mem_get_info(device)
        if size > free // 4:  # leave the GPU to the model: large data sets keep the DataLoader path
            log.info("data: %.1f GiB of tensors is over a quarter of free GPU memory; using the DataLoader",
                     size / 2**30)
            return False
    return possible


def build_loaders(cfg: Any, data: Any) -> dict[str, Any]:
    from torchkiln.data.collate import build_collate
    from torchkiln.data.loaders import make_loader
    from torchkiln.engine.trainer import resolve_device

    d = cfg.data
    device = resolve_device(cfg.trainer.device)
    collate = build_collate(d.collate)
    from torchkiln.engine import distributed

    common = dict(num_workers=d.num_workers, pin_memory=d.pin_memory, persistent_workers=d.persistent_workers,
                  prefetch_factor=d.prefetch_factor, seed=cfg.seed, collate_fn=collate, device=device,
                  rank=distributed.rank(), world_size=distributed.world_size())  # DDP: one shard per rank
    balanced = balanced_labels(cfg, data.train)
    fast = use_fast_path(cfg, data.train, device)
    if fast and d.num_workers:
        log.info("data: fast in-memory path (num_workers=%d unused)", d.num_workers)
    loaders = {"train": make_loader(data.train, d.batch_size, train=True, shuffle=d.shuffle, drop_last=d.drop_last,
                                    balanced_labels=balanced, fast=fast, **common)}
    for split in ("val", "test"):
        ds = getattr(data, split)
        if ds is not None:
            loaders[split] = make_loader(ds, d.eval_batch_size or d.batch_size, train=False,
                                         fast=use_fast_path(cfg, ds, device), **common)
    return loaders


def sampler_head(spec: Any) -> tuple[str, str | None]:
    """(type, head) of `data.sampler`: a name, or {type, args: {head}}."""
    return (spec, None) if isinstance(spec, str) else (spec.type, spec.args.head)


def balanced_labels(cfg: Any, train: Dataset) -> np.ndarray | None:
    """The class that `data.sampler: balanced` weighs each training sample by (1 / its count): the
    label, or for a multihead task the combined class or one head's class; None when not balanced."""
    from torchkiln.data.splits import dataset_labels
    from torchkiln.tasks import MultiHeadTask, build_task, dataset_targets

    kind, head = sampler_head(cfg.data.sampler)
    if kind != "balanced":
        return None
    task = build_task(cfg.task)
    if isinstance(task, MultiHeadTask):  # the heads' targets, by name or decoded from the combined class
        return task.sampling_labels(dataset_targets(train), head).numpy()
    labels = dataset_labels(train)
    if labels is None:
        raise ConfigError("data.sampler: balanced needs single-label class targets (a dataset with"
                          " `targets`); this training set has none")
    return labels


def write_skipped(run_dir: Path, skipped: list[tuple[str, str]]) -> None:
    """The broken inputs that `on_error: skip` left out, one per line, in the run directory."""
    if skipped:
        lines = [f"{path}\t{reason}" for path, reason in skipped]
        (Path(run_dir) / "skipped_files.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
