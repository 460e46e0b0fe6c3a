"""Config -> datasets (split, transformed per split) and loaders (DataLoader or the fast path)."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from torchkiln.errors import ConfigError
from torchkiln.rundir import SKIPPED

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("torchkiln")


def build_dataset(comp: Any, where: str, data_cfg: Any) -> Dataset:
    """Build one dataset; `data.on_error` / `data.max_skipped` reach datasets that accept them."""
    from torchkiln.registry import DATASETS, build

    factory = DATASETS.get(comp.type, f"{where}.type")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {k: getattr(data_cfg, k) for k in ("on_error", "max_skipped", "boxes") if k in params and k not in comp.args}
    return build(comp, DATASETS, where, **extra)


def decodes_images(dataset: Dataset) -> bool:
    from torchkiln.data.wrappers import unwrap

    inner, _ = unwrap(dataset, lambda ds: bool(getattr(ds, "decodes_images", False)))
    return bool(getattr(inner, "decodes_images", False))


def with_transforms(dataset: Dataset | None, steps: list, where: str, min_box: float = 1.0) -> Dataset | None:
    """Wrap with the split's pipeline; decoded images always end as float32 in [0, 1]. Detection
    data get a box-aware pipeline ending in SanitizeBoundingBoxes (boxes below `min_box` go)."""
    from torchkiln.data.detection.transforms import BoxTransformed, build_box_pipeline, is_detection
    from torchkiln.data.transforms import Transformed, build_pipeline

    if dataset is None:
        return None
    if is_detection(dataset):
        return BoxTransformed(dataset, build_box_pipeline(steps, where, min_box))
    pipeline = build_pipeline(steps, where, to_float=decodes_images(dataset))
    return dataset if pipeline is None else Transformed(dataset, pipeline)


def _task_is(cfg: Any, kind: str) -> bool:
    """Whether the configured task is a `kind` (a class name in torchkiln.tasks) or a subclass of one."""
    import torchkiln.tasks as tasks

    return isinstance(tasks.build_task(cfg.task), getattr(tasks, kind))


def build_data(cfg: Any, data_cls: type, normalization: dict[str, Any] | None = None) -> Any:
    """Datasets per split; `normalization` (a run's stored statistics) replaces fitting them."""
    from torchkiln.data.groups import dataset_groups
    from torchkiln.data.skipping import Skipped, skip_broken
    from torchkiln.data.splits import split_dataset
    from torchkiln.registry import load_builtins

    load_builtins()
    d = cfg.data
    dataset = build_dataset(d.dataset, "data.dataset", d)
    if _task_is(cfg, "RankingTask") and dataset_groups(dataset) is None:
        log.warning("data: the ranking data set exposes no query ids (a `groups` attribute, one per sample):"
                    " splits and batches go by item and break queries apart")
    seed = d.split_seed if d.split_seed is not None else cfg.seed
    val_frac = 0.0 if d.val_dataset else d.val_split
    test_frac = 0.0 if d.test_dataset else d.test_split
    train, val, test = split_dataset(dataset, val_frac, test_frac, seed, stratify=d.stratify,
                                     folds=d.folds, fold=d.fold)
    logs = {"train": _skip_log(dataset), "val": _skip_log(dataset), "test": _skip_log(dataset)}
    if d.val_dataset:
        val = build_dataset(d.val_dataset, "data.val_dataset", d)
        logs["val"] = _skip_log(val)
    if d.test_dataset:
        test = build_dataset(d.test_dataset, "data.test_dataset", d)
        logs["test"] = _skip_log(test)
    stats = None
    if d.normalize is not None:
        from torchkiln.data.normalize import Standardization, fit, standardize_splits

        stats = Standardization.from_dict(normalization) if normalization is not None else \
            fit(train, d.normalize.features, d.normalize.targets and _task_is(cfg, "RegressionTask"))
        train, val, test = standardize_splits(dataset, [train, val, test], stats)
    t, box = d.transforms, d.boxes.min_size
    return data_cls(
        skip_broken(with_transforms(train, t.train, "data.transforms.train", box), logs["train"]),
        skip_broken(with_transforms(val, t.eval, "data.transforms.eval", box), logs["val"]),
        skip_broken(with_transforms(test, t.eval, "data.transforms.eval", box), logs["test"]),
        getattr(dataset, "num_classes", None),
        getattr(dataset, "classes", None),
        skipped=Skipped(list({id(g): g for g in logs.values() if g is not None}.values())),
        normalization=stats,
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
    from torchkiln.data.detection.collate import DetectionCollate
    from torchkiln.data.detection.transforms import is_detection
    from torchkiln.data.loaders import make_loader
    from torchkiln.engine.device import resolve_device

    d = cfg.data
    device = resolve_device(cfg.trainer.device)
    collate = DetectionCollate() if d.collate is None and is_detection(data.train) else build_collate(d.collate)
    from torchkiln.engine import distributed

    common = dict(num_workers=d.num_workers, pin_memory=d.pin_memory, persistent_workers=d.persistent_workers,
                  prefetch_factor=d.prefetch_factor, seed=cfg.seed, collate_fn=collate, device=device,
                  rank=distributed.rank(), world_size=distributed.world_size())  # DDP: one shard per rank
    balanced = balanced_labels(cfg, data.train)
    fast = use_fast_path(cfg, data.train, device)
    if fast and d.num_workers:
        log.info("data: fast in-memory path (num_workers=%d unused)", d.num_workers)
    shards = {"rank": distributed.rank(), "world_size": distributed.world_size()}
    queries = query_sampler(cfg, data.train, d.batch_size, train=True, **shards)
    if queries is not None and balanced is not None:
        raise ConfigError("data.sampler: balanced and whole-query batches (data.query_batches) exclude each"
                          " other; set one of them off")
    loaders = {"train": make_loader(data.train, d.batch_size, train=True, shuffle=d.shuffle, drop_last=d.drop_last,
                                    balanced_labels=balanced, fast=fast, batch_sampler=queries, **common)}
    if d.mixup is not None:  # soft targets from mixed training batches (data/mixup.py)
        from torchkiln.data.mixup import with_mixup

        loaders["train"] = with_mixup(loaders["train"], d.mixup, data.num_classes)
    for split in ("val", "test"):
        ds = getattr(data, split)
        if ds is not None:
            size = d.eval_batch_size or d.batch_size
            loaders[split] = make_loader(ds, size, train=False, fast=use_fast_path(cfg, ds, device),
                                         batch_sampler=query_sampler(cfg, ds, size, train=False, **shards),
                                         **common)
    return loaders


def query_sampler(cfg: Any, dataset: Dataset, batch_size: int, *, train: bool, rank: int, world_size: int
                  ) -> Any:
    """Whole queries per batch (data/query_sampler.py) when `data.query_batches` asks for it: auto
    for the ranking task on data with query ids. None: the plain sampler."""
    from torchkiln.data.groups import dataset_groups
    from torchkiln.data.query_sampler import QueryBatchSampler, queries_per_batch

    d = cfg.data
    if d.query_batches is False or (d.query_batches == "auto" and not _task_is(cfg, "RankingTask")):
        return None
    groups = dataset_groups(dataset)
    if groups is None:
        if d.query_batches is True:
            raise ConfigError("data.query_batches: true needs query ids: a dataset with `groups` (one per"
                              " sample), e.g. TensorFile with a 'qid' array")
        return None
    return QueryBatchSampler(groups, queries_per_batch(groups, batch_size), shuffle=d.shuffle and train, seed=cfg.seed,
                             drop_last=d.drop_last and train, rank=rank, world_size=world_size, pad=train)


def sampler_head(spec: Any) -> tuple[str, str | None]:
    """(type, head) of `data.sampler`: a name, or {type, args: {head}}."""
    return (spec, None) if isinstance(spec, str) else (spec.type, spec.args.head)


def balanced_labels(cfg: Any, train: Dataset) -> np.ndarray | None:
    """The class that `data.sampler: balanced` weighs each training sample by (1 / its count): the
    label, or for a multihead task the combined class or one head's class; None when not balanced."""
    from torchkiln.data.splits import dataset_labels
    from torchkiln.data.targets import dataset_targets
    from torchkiln.tasks import MultiHeadTask, build_task

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


def _skip_log(dataset: Dataset) -> Any:
    """The SkipLog of a data set read under on_error: skip (under its wrappers), else None."""
    from torchkiln.data.wrappers import unwrap

    return getattr(unwrap(dataset, lambda ds: getattr(ds, "skip_log", None) is not None)[0], "skip_log", None)


def write_skipped(run_dir: Path, skipped: list[tuple[str, str]]) -> None:
    """The broken inputs that `on_error: skip` left out, one per line, in the run directory: those
    found when the data were built, then (appended by any process) those found while reading."""
    path = Path(run_dir) / SKIPPED
    earlier = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []  # a resumed run's
    lines = list(dict.fromkeys([f"{p}\t{reason}" for p, reason in skipped] + earlier))
    if lines:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if hasattr(skipped, "attach"):
        skipped.attach(path)
