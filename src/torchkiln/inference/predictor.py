"""`torchkiln.load(RUN_DIR or EXPORT_DIR)`: a Predictor holding the model, its preprocessing, its
task and its class names. `predictor(images)` gives the task's scores for PIL images, tensors or
paths; `predictor.predict(source, out=...)` writes the prediction file, as `kiln predict` does."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.engine.device import cat_outputs, to_cpu
from torchkiln.errors import CheckpointError, ConfigError, DataError
from torchkiln.inference.card import CARD, card_from_config, read_card, require_model_type
from torchkiln.inference.sources import (
    SPLIT_PREFIX,
    Source,
    collate,
    image_csv,
    image_folder,
    split_source,
)
from torchkiln.tasks.predictions import PredictOptions

log = logging.getLogger("torchkiln")


@dataclass
class PredictResult:
    out: Path
    rows: int
    inputs: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.inputs / max(self.seconds, 1e-9)


def load(path: str | Path, checkpoint: str = "best", device: str | torch.device | None = None,
         precision: str | None = None) -> Predictor:
    """A Predictor from a run directory (its `checkpoint`: best, last or a path) or an export folder
    (model.json with model.safetensors or model.pt)."""
    path = Path(path)
    if (path / CARD).is_file():
        card = read_card(path)
        return Predictor(build_model(card, _export_weights(path)), card, device=device, precision=precision)
    from torchkiln.engine.checkpoint import FORMAT, load_checkpoint, model_weights
    from torchkiln.rundir import CHECKPOINTS, checkpoint_path

    ckpt = checkpoint_path(path, checkpoint)
    if not ckpt.is_file() and not (path / CHECKPOINTS).is_dir():
        raise CheckpointError(f"{path}: neither a run directory (no {CHECKPOINTS}/) nor an export folder (no {CARD})")
    state = load_checkpoint(ckpt)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}: not a torchkiln checkpoint")
    require_model_type(state.get("config"), ckpt)
    card = card_from_config(state["config"])
    return Predictor(build_model(card, model_weights(state, ckpt)), card, device=device, precision=precision,
                     run_dir=path if (path / CHECKPOINTS).is_dir() else None, checkpoint=ckpt)


def _export_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "model.pt").is_file():
        from torchkiln.engine.checkpoint import load_checkpoint, model_weights

        return model_weights(load_checkpoint(folder / "model.pt"), folder / "model.pt")
    raise CheckpointError(f"{folder}: no model.safetensors or model.pt beside {CARD}")


def build_model(card: dict[str, Any], weights: dict[str, torch.Tensor]) -> nn.Module:
    """The card's model (type and arguments, through the registry) with `weights` loaded, in eval mode."""
    from torchkiln.engine.checkpoint import load_model_weights
    from torchkiln.registry import MODELS, construct, load_builtins

    load_builtins()
    spec = card["model"]
    args = {k: v for k, v in (spec.get("args") or {}).items() if not (k == "num_classes" and v is None)}
    model = construct(MODELS.get(spec["type"], "model.type"), args, "model", spec["type"])
    try:
        load_model_weights(model, weights, strict=True)
    except CheckpointError as exc:
        raise CheckpointError(f"model {spec['type']}: the weights do not fit it: {exc}") from exc
    return model.eval()


class Predictor:
    """A trained model with what feeds it; batched under inference_mode and the run's autocast."""

    def __init__(self, model: nn.Module, card: dict[str, Any], *, device: str | torch.device | None = None,
                 precision: str | None = None, run_dir: Path | None = None, checkpoint: Path | None = None):
        from torchkiln.data.transforms import build_pipeline
        from torchkiln.engine.placement import Placement
        from torchkiln.engine.step import OptimizerStep
        from torchkiln.engine.trainer import Trainer
        from torchkiln.tasks import build_task

        self.model, self.card, self.run_dir, self.checkpoint = model, card, run_dir, checkpoint
        self.task = build_task(_without_losses(card.get("task") or "classification"))
        prep = card.get("preprocessing") or {}
        self.mode = (prep.get("decode") or {}).get("mode", "RGB")
        self.decodes = prep.get("decode") is not None
        self.transform = build_pipeline(prep.get("eval_transforms") or [], "preprocessing.eval_transforms",
                                        to_float=self.decodes)
        self.features = self._normalization(prep.get("normalization"))
        self.class_names = card.get("class_names")
        self.num_classes = card.get("num_classes") or (len(self.class_names) if isinstance(self.class_names, list) else None)
        self.trainer = Trainer(model, task=self.task, step=OptimizerStep(precision=precision or card.get("precision", "32")),
                               placement=Placement(device))

    def _normalization(self, stats: dict[str, Any] | None) -> Any:
        if not stats:
            return None
        from torchkiln.data.normalize import Standardization

        s = Standardization.from_dict(stats)
        if s.targets is not None:
            self.task.set_target_scale(*s.targets)
        return s.features

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    # -- in memory ------------------------------------------------------------------------------
    def preprocess(self, image: Any) -> torch.Tensor:
        """One input as the model takes it: a path or PIL image is decoded, then the eval transforms."""
        from torchkiln.data.images import decode_image

        if isinstance(image, (str, Path)):
            image = decode_image(Path(image), self.mode)
        elif not isinstance(image, torch.Tensor):
            from torchvision.transforms.v2.functional import pil_to_tensor

            image = pil_to_tensor(image.convert(self.mode))
        x = self.transform(image) if self.transform is not None else image
        x = x.as_subclass(torch.Tensor)
        if self.features is not None:
            x = (x - self.features[0]) / self.features[1]
        return x

    def __call__(self, images: Any, batch_size: int = 64) -> Any:
        """The task's scores (class probabilities, label probabilities, values; a dict per head) for
        one input, a list of them or a tensor batch of them (samples along the first dimension), on
        the CPU. A tensor is one input or a batch by the shape of one training sample, which the run
        recorded; without it (a run from the Python API), a 4-D tensor is a batch of images, a 2-D
        one of tensor data (rows of features)."""
        single = not self._is_batch(images)
        items = [images] if single else list(images)
        stack = torch.stack if self.task.stacks_inputs else list
        batches = ({"input": stack([self.preprocess(im) for im in items[i:i + batch_size]])}
                   for i in range(0, len(items), batch_size))
        parts = [to_cpu(self.task.scores(outputs)) for _, outputs, _ in self.trainer.forward_pass(batches)]
        scores = cat_outputs(parts)
        return _first(scores) if single else scores

    def _is_batch(self, images: Any) -> bool:
        if isinstance(images, (list, tuple)):
            return True
        if not isinstance(images, torch.Tensor):
            return False  # a path or a PIL image
        shape = (self.card.get("input") or {}).get("shape")
        if isinstance(shape, list) and not self.decodes:  # (decoded images are resized by the transforms)
            if images.dim() in (len(shape), len(shape) + 1):
                return images.dim() == len(shape) + 1
            raise DataError(f"predictor: a tensor of shape {tuple(images.shape)} is neither one input of the"
                            f" run's shape {tuple(shape)} nor a batch of them")
        return images.dim() == 4 if self.decodes or images.dim() > 2 else images.dim() == 2

    # -- files ----------------------------------------------------------------------------------
    def source(self, spec: str | Path, *, image_col: str | None = None, id_col: str | None = None,
               root: str | Path | None = None) -> Source:
        """A folder of images, a CSV of image paths, or `split:test` / `split:val` of the run."""
        text = str(spec)
        if text.startswith(SPLIT_PREFIX):
            return split_source(self._run_split(text[len(SPLIT_PREFIX):]), text[len(SPLIT_PREFIX):])
        path = Path(spec)
        if path.is_dir():
            return image_folder(path, self.mode, self.transform)
        if path.is_file() and path.suffix.lower() == ".csv":
            col = image_col or self.card.get("image_col") or "image"
            return image_csv(path, col, id_col, Path(root) if root is not None else None, self.mode, self.transform)
        raise DataError(f"{path}: --input must be a folder of images, a .csv of image paths, or split:test|val"
                        f"{'' if path.exists() else ' (not found)'}")

    def _run_split(self, split: str) -> Any:
        if split not in ("test", "val"):
            raise ConfigError(f"--input split:{split}: expected split:test or split:val")
        if self.run_dir is None:
            raise ConfigError(f"--input split:{split}: needs a run directory (an export folder has no data)")
        from torchkiln.inference.run_data import run_split

        return run_split(self.run_dir, self.checkpoint, split)

    def predict(self, source: str | Path, out: str | Path | None = None, *, id_col: str = "id",
                pred_col: str = "pred", probs: bool = False, topk: int | None = None, tta: str | None = None,
                on_error: str = "raise", batch_size: int = 64, num_workers: int = 0,
                image_col: str | None = None, root: str | Path | None = None, progress: bool = False,
                coco_ann: str | None = None) -> PredictResult:
        """Write the prediction file for `source` (default RUN_DIR/predictions/predictions.csv);
        detection: one row per box, and the COCO results JSON beside it (ids from `coco_ann`)."""
        from torchkiln.inference.output import OrderedCsv
        from torchkiln.inference.tta import make_tta

        src = self.source(source, image_col=image_col, id_col=id_col, root=root)
        out = Path(out) if out is not None else self._default_out()
        options = PredictOptions(id_col, pred_col, probs, topk, self.class_names, self.num_classes, coco_ann)
        if topk is not None and topk < 1:
            raise ConfigError(f"--topk: expected a number >= 1; found {topk}")
        self.task.use_tta(make_tta(tta))  # refused here (before any file) by a task that cannot average
        sink = OrderedCsv(out, self.task.prediction_writer(options), src.ids, on_error)
        started = time.perf_counter()
        try:
            for batch, outputs, _ in self.trainer.forward_pass(self._batches(src, sink, batch_size, num_workers, progress)):
                sink.add(batch["index"].tolist(), to_cpu(self.task.scores(outputs)))
        except BaseException:
            sink.abort()
            raise
        finally:
            self.task.use_tta(None)
        files = sink.close()
        seconds = time.perf_counter() - started
        result = PredictResult(out, sink.rows, len(src.ids), seconds, sink.skipped, files)
        log.info("%d inputs -> %d rows in %.2f s (%.0f rows/s): %s", result.inputs, result.rows, seconds,
                 result.rows_per_s, out)
        if sink.skipped:
            log.warning("%d unreadable input(s) written as empty predictions (listed in %s); first: %s",
                        len(sink.skipped), files[-1], sink.skipped[0][1])
        return result

    def _default_out(self) -> Path:
        if self.run_dir is None:
            raise ConfigError("--out: needed when predicting from an export folder (no run directory)")
        from torchkiln.rundir import PREDICTIONS

        return self.run_dir / PREDICTIONS

    def _batches(self, src: Source, sink: Any, batch_size: int, num_workers: int, progress: bool) -> Iterator[Any]:
        """The source's batches in order; unreadable inputs go to `sink` (and batches of none are dropped)."""
        from functools import partial

        from torch.utils.data import DataLoader

        loader = DataLoader(src.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=partial(collate, stack=self.task.stacks_inputs), pin_memory=self.device.type == "cuda")
        bar = _bar(len(src.ids), progress)
        for batch in loader:
            failed = batch.pop("failed")
            sink.failed(failed)
            if bar is not None:
                bar.update(len(batch["index"]) + len(failed))
            if batch["input"] is not None:
                yield batch
        if bar is not None:
            bar.close()


def _without_losses(spec: Any) -> Any:
    """The task spec without its heads' losses: inference needs none, and a loss's `balanced`
    weights would need the training labels."""
    if not isinstance(spec, dict) or not isinstance((spec.get("args") or {}).get("heads"), dict):
        return spec
    heads = {name: ({k: v for k, v in head.items() if k != "loss"} if isinstance(head, dict) else head)
             for name, head in spec["args"]["heads"].items()}
    return {**spec, "args": {**spec["args"], "heads": heads}}


def _bar(total: int, enabled: bool) -> Any:
    import sys

    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="predict", unit="img", file=sys.stderr, leave=False, dynamic_ncols=True)


def _first(scores: Any) -> Any:
    return {k: v[0] for k, v in scores.items()} if isinstance(scores, dict) else scores[0]

