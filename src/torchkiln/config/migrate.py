"""Accept pytorch-template style configs (`arch`, `data_loader`, `lr_scheduler`, ...) by
translating them into torchkiln's shape, with a note of what moved where."""

from __future__ import annotations

import logging
from typing import Any

from torchkiln.errors import ConfigError

log = logging.getLogger("torchkiln")

TEMPLATE_KEYS = {"arch", "data_loader", "lr_scheduler", "n_gpu"}
LOSSES = {
    "nll_loss": "NLLLoss",
    "cross_entropy": "CrossEntropyLoss",
    "mse_loss": "MSELoss",
    "l1_loss": "L1Loss",
    "smooth_l1_loss": "SmoothL1Loss",
    "huber_loss": "HuberLoss",
    "binary_cross_entropy": "BCELoss",
    "binary_cross_entropy_with_logits": "BCEWithLogitsLoss",
}
METRICS = {"accuracy": "accuracy", "top_k_acc": "accuracy@3", "my_metric": "accuracy", "my_metric2": "accuracy@3"}
LOADER_ARGS = {"batch_size", "shuffle", "validation_split", "num_workers", "pin_memory", "drop_last"}


def is_template(data: dict[str, Any]) -> bool:
    return bool(TEMPLATE_KEYS & set(data))


def from_template(data: dict[str, Any], source: str) -> dict[str, Any]:
    """pytorch-template config.json -> torchkiln config (plain data, validated later)."""
    out: dict[str, Any] = {}
    moved: list[str] = []
    if "name" in data:
        out["name"] = str(data["name"]).replace("/", "-")
    if "arch" in data:
        out["model"] = _component(data["arch"], "arch", source)
        moved.append("arch -> model")
    if "data_loader" in data:
        loader = _component(data["data_loader"], "data_loader", source)
        args = dict(loader["args"])
        section: dict[str, Any] = {}
        for key in LOADER_ARGS & set(args):
            value = args.pop(key)
            if key == "validation_split":
                if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                    raise ConfigError(f"{source}: data_loader.args.validation_split: a sample count ({value})"
                                      f" is not supported; give a fraction such as 0.1")
                section["val_split"] = float(value)
            else:
                section[key] = value
        section["dataset"] = {"type": loader["type"], "args": args}
        out["data"] = section
        moved.append("data_loader -> data (its type must name a Dataset, not a DataLoader)")
    if "optimizer" in data:
        out["optimizer"] = _component(data["optimizer"], "optimizer", source)
    if "loss" in data:
        loss = data["loss"]
        if isinstance(loss, str):
            out["loss"] = {"type": LOSSES.get(loss, loss)}
            moved.append(f"loss '{loss}' -> {out['loss']['type']}")
        else:
            out["loss"] = loss
    if "metrics" in data:
        out["metrics"] = [METRICS.get(m, m) if isinstance(m, str) else m for m in data["metrics"]]
    if data.get("lr_scheduler"):
        out["scheduler"] = _component(data["lr_scheduler"], "lr_scheduler", source)
        moved.append("lr_scheduler -> scheduler")
    trainer = dict(data.get("trainer") or {})
    tk: dict[str, Any] = {}
    if "epochs" in trainer:
        tk["epochs"] = trainer["epochs"]
    if "save_period" in trainer:
        tk["save_period"] = trainer["save_period"]
    if trainer.get("monitor") and trainer["monitor"] != "off":
        mode, _, metric = str(trainer["monitor"]).partition(" ")
        if mode not in ("min", "max") or not metric:
            raise ConfigError(f"{source}: trainer.monitor: expected 'min val_loss' or 'max val_accuracy';"
                              f" found {trainer['monitor']!r}")
        split, _, name = metric.partition("_")
        tk["monitor"] = f"{split}/{name}" if split in ("val", "train") and name else metric
        tk["mode"] = mode
    if trainer.get("early_stop"):
        tk["early_stop"] = int(trainer["early_stop"])
    if tk:
        out["trainer"] = tk
    if "save_dir" in trainer:
        out["output_dir"] = trainer["save_dir"]
    if "tensorboard" in trainer:
        out["logging"] = {"tensorboard": bool(trainer["tensorboard"])}
    for key in set(data) - {"name", "arch", "data_loader", "optimizer", "loss", "metrics", "lr_scheduler",
                            "trainer", "n_gpu"}:
        out[key] = data[key]  # already torchkiln keys: kept, and validated as usual
    log.info("%s: pytorch-template config translated (%s)", source, "; ".join(moved) or "no changes")
    return out


def _component(value: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict) or "type" not in value:
        raise ConfigError(f"{source}: {where}: expected {{type, args}}; found {value!r}")
    return {"type": value["type"], "args": dict(value.get("args") or {})}
