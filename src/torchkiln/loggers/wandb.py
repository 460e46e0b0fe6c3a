"""Weights & Biases: the same scalars, validation figures and config as TensorBoard.

`wandb` is an optional extra, imported only when a run starts. Offline mode (`mode: offline` or
WANDB_MODE=offline) writes `wandb/offline-run-*` in the run directory with no network; upload it
later with `wandb sync`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torchkiln.errors import ConfigError
from torchkiln.loggers.base import Logger, PictureCadence

RUN_ID_FILE = "wandb-run-id"


def require_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "logging.wandb: the wandb package is not installed; pip install 'torchkiln[wandb]'"
            " (or remove logging.wandb)"
        ) from exc


class WandbLogger(Logger):
    def __init__(self, run_dir: str | Path, *, project: str = "torchkiln", mode: str | None = None,
                 entity: str | None = None, name: str | None = None, tags: list[str] | None = None,
                 config: dict[str, Any] | None = None, images: int = 16,
                 class_names: list[str] | None = None, images_every: int | None = None):
        require_wandb()
        self.run_dir = Path(run_dir)
        self.init_args = {"project": project, "entity": entity, "tags": tags or None,
                          "name": name or f"{self.run_dir.parent.name}/{self.run_dir.name}"}
        self.mode = mode
        self.config = config
        self.max_images = images
        self.pictures = PictureCadence(images_every)
        self.class_names = class_names
        self.run = None

    def start(self, info, resume_epoch=None, resume_step=0):
        import wandb

        id_file = self.run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume_epoch is not None and id_file.is_file() else None
        self.run = wandb.init(
            **self.init_args,
            dir=str(self.run_dir),
            config=self.config,
            mode=self.mode or os.environ.get("WANDB_MODE") or "online",
            id=run_id,  # None: wandb makes a new one, kept in RUN_ID_FILE for resuming
            resume="allow" if run_id else None,
        )
        id_file.write_text(self.run.id)
        self.pictures.start(info.get("epochs"))
        # Epoch records are plotted against the epoch; step rows against the optimizer step.
        self.run.define_metric("epoch")
        for prefix in ("train/*", "val/*", "time/*", "memory/*", "gpu/*"):
            self.run.define_metric(prefix, step_metric="epoch")
        for key in ("train/loss_step", "train/grad_norm", "train/skipped_steps"):
            self.run.define_metric(key, step_metric="trainer/global_step")
        self.run.define_metric("lr/*", step_metric="trainer/global_step")

    def log_steps(self, rows):
        for step, vals in rows:
            self.run.log({**vals, "trainer/global_step": step})

    def wants_validation(self, epoch):
        return self.pictures.due(epoch)

    def log_validation(self, epoch, step, sample):
        with self.pictures.timed(epoch):
            self._pictures(epoch, sample)

    def _pictures(self, epoch, sample):
        import wandb

        from torchkiln.loggers.images import validation_pictures

        pictures = validation_pictures(sample, self.class_names, epoch)
        self.run.log({**{tag: wandb.Image(p) for tag, p in pictures.items()}, "epoch": epoch})

    def log_boxes(self, epoch, step, sample):
        """`val/boxes`: the validation images with W&B's own box overlays, `predictions` (score >=
        BOX_SCORE, the 20 best, with their scores) and `ground_truth`, labelled by class name."""
        import wandb

        from torchkiln.loggers.images import rgb_uint8

        with self.pictures.timed(epoch):
            images = [wandb.Image(rgb_uint8(image).permute(1, 2, 0).numpy(),
                                  boxes=wandb_boxes(pred, true, self.class_names))
                      for image, pred, true in zip(sample.images, sample.predicted, sample.true)]
            self.run.log({"val/boxes": images, "epoch": epoch})

    def log_epoch(self, epoch, step, record):
        self.run.log({**record, "epoch": epoch, "trainer/global_step": step})

    def finish(self, summary):
        if self.run is None:
            return
        for key in ("best", "best_epoch", "epochs_completed", "global_step", "stopped_early"):
            if summary.get(key) is not None:
                self.run.summary[key] = summary[key]
        self.run.finish()
        self.run = None


def wandb_boxes(predicted: dict[str, Any], true: dict[str, Any], class_names: list[str] | None
                ) -> dict[str, dict[str, Any]]:
    """W&B box groups (pixel XYXY) for one image: labels 1..C are class_names[0..C-1]."""
    from torchkiln.loggers.images import shown_boxes

    keep = shown_boxes(predicted)
    shown = {int(i) for i in true["labels"].tolist()} | {int(i) for i in predicted["labels"][keep].tolist()}
    names = {i: (class_names[i - 1] if class_names and 1 <= i <= len(class_names) else str(i)) for i in shown}

    def group(boxes: Any, labels: Any, scores: Any = None) -> dict[str, Any]:
        data = []
        for n, ((x1, y1, x2, y2), label) in enumerate(zip(boxes.float().tolist(), labels.tolist())):
            box = {"position": {"minX": x1, "minY": y1, "maxX": x2, "maxY": y2}, "domain": "pixel",
                   "class_id": int(label), "box_caption": names[int(label)]}
            if scores is not None:
                box["scores"] = {"score": float(scores[n])}
                box["box_caption"] += f" {float(scores[n]):.2f}"
            data.append(box)
        return {"box_data": data, "class_labels": names}

    return {"predictions": group(predicted["boxes"][keep], predicted["labels"][keep], predicted["scores"][keep]),
            "ground_truth": group(true["boxes"], true["labels"])}
