"""The model card: everything that rebuilds a trained model and feeds it, as plain JSON data.

It is `model.json` in an export folder, and it is derived from a checkpoint (its resolved config)
for a run directory, so `torchkiln.load` reads both the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchkiln.errors import CheckpointError

CARD = "model.json"
CLASS_NAMES_KEY = "class_names"  # the data's class names, beside the resolved config in every checkpoint
NORMALIZATION_KEY = "normalization"  # data.normalize's statistics (commands/train.py writes both)
INPUT_KEY = "input"  # one training sample's input shape and dtype (commands/train.py, from the probe's batch)


def card_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The card of a checkpoint's resolved config."""
    from torchkiln.registry import DATASETS, load_builtins

    load_builtins()
    data = config.get("data") or {}
    dataset = data.get("dataset") or {}
    args = dataset.get("args") or {}
    try:
        decodes = bool(getattr(DATASETS.get(dataset.get("type", ""), "data.dataset.type"), "decodes_images", False))
    except Exception:  # noqa: BLE001 - a user's dataset that no longer imports: no decoding known
        decodes = False
    model = config.get("model") or {}
    trainer = config.get("trainer") or {}
    return {
        "model": {"type": model.get("type"), "args": dict(model.get("args") or {})},
        "num_classes": (model.get("args") or {}).get("num_classes"),
        "task": config.get("task") or "classification",
        "heads": _heads(config.get("task")),
        "class_names": config.get(CLASS_NAMES_KEY),
        "preprocessing": {
            "decode": {"mode": args.get("mode", "RGB")} if decodes else None,
            "eval_transforms": ((data.get("transforms") or {}).get("eval")) or [],
            "normalization": config.get(NORMALIZATION_KEY),
            "input": "images decoded to uint8 RGB (or L) tensors (C, H, W), then the eval transforms"
                     " (torchvision.transforms.v2) in order, with ToDtype(float32, scale=True) before the first"
                     " float-only step or at the end; tensor data sets as stored",
        },
        "image_col": args.get("image_col") if isinstance(args.get("image_col"), str) else None,
        "precision": str(trainer.get("precision", "32")),
        "input": config.get(INPUT_KEY) if isinstance(config.get(INPUT_KEY), dict) else None,
    }


def input_info(inputs: Any) -> dict[str, Any]:
    """What one sample of a batch of `inputs` (a tensor) is: its shape, channels (images) and dtype."""
    shape = list(inputs.shape[1:])
    return {"shape": shape, "channels": shape[0] if len(shape) == 3 else None, "dtype": str(inputs.dtype).replace("torch.", "")}


def plain_names(names: Any) -> list[str] | dict[str, list[str]] | None:
    """A data set's class names as plain data (a list, or a list per head), else None."""
    if isinstance(names, dict):
        return {str(k): [str(c) for c in v] for k, v in names.items() if v is not None}
    if names is not None and not isinstance(names, str) and hasattr(names, "__iter__"):
        return [str(c) for c in names]
    return None


def _heads(task: Any) -> dict[str, Any] | None:
    if isinstance(task, dict) and task.get("type") == "multihead":
        spec = (task.get("args") or {}).get("heads") or {}
        return {name: (h["classes"] if isinstance(h, dict) else h) for name, h in spec.items()}
    return None


def read_card(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CARD
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable model card ({exc})") from exc
    if not isinstance(card, dict) or not isinstance(card.get("model"), dict) or not card["model"].get("type"):
        raise CheckpointError(f"{path}: no model type in it (written by `kiln export`?)")
    return card


def require_model_type(config: Any, ckpt: Any) -> None:
    """A checkpoint rebuilds its model by the type in its config: a run from the Python API made
    without `make_trainer(config=...)` has none, which is said here with what to do."""
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict) and model.get("type"):
        return
    from torchkiln.errors import CheckpointError

    raise CheckpointError(
        f"{ckpt}: its config names no model type (a Python-API run made without make_trainer(config=...)),"
        " so nothing can rebuild the model: give make_trainer(config={'model': {'type': 'my_pkg.models:Net',"
        " 'args': {...}}}); the weights alone are torch.load(path, weights_only=True)['model']")
