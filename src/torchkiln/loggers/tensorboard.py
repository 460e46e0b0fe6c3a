"""TensorBoard: per-step loss, LR, grad norm; per-epoch metrics, throughput and memory; validation
figures (misclassified samples, confusion matrix); optional weight and gradient histograms; the
config as hparams with the final metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from torchkiln.loggers.base import Logger, PictureCadence
from torchkiln.rundir import TENSORBOARD


def flat_config(config: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> int/float/str/bool (lists and None as text), as hparams accept."""
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class GradientTaps:
    """Keeps a reference to each parameter's latest gradient (no copy), so histograms can be drawn
    after the optimizer step has set `.grad` to None."""

    def __init__(self, model: nn.Module):
        self.grads: dict[str, Any] = {}
        self.handles = [
            p.register_post_accumulate_grad_hook(lambda p, name=name: self.grads.__setitem__(name, p.grad))
            for name, p in model.named_parameters() if p.requires_grad
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.grads = [], {}


class TensorBoardLogger(Logger):
    def __init__(self, run_dir: str | Path, subdir: str = TENSORBOARD, *, model: nn.Module | None = None,
                 histograms: int | None = None, images: int = 16, class_names: list[str] | None = None,
                 config: dict[str, Any] | None = None, images_every: int | None = None):
        self.log_dir = Path(run_dir) / subdir
        self.model = model
        self.histograms = histograms if model is not None else None
        self.max_images = images
        self.pictures = PictureCadence(images_every)
        self.class_names = class_names
        self.config = config
        self.writer = None
        self.taps: GradientTaps | None = None

    def start(self, info, resume_epoch=None, resume_step=0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the events of earlier files at or after this step, so what a
        # resumed run logs again replaces what the stopped run had logged past its checkpoint.
        self.writer = SummaryWriter(str(self.log_dir),
                                    purge_step=resume_step + 1 if resume_epoch is not None else None)
        self.pictures.start(info.get("epochs"))
        if self.histograms:
            self.taps = GradientTaps(self.model)

    @property
    def events(self):
        """The writer's file writer, which takes whole Summary protos: a step's scalars in one event."""
        return self.writer.file_writer

    def _add(self, values: dict[str, float], step: int) -> None:
        """All of a step's scalars in one event."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.events.add_summary(
            Summary(value=[Summary.Value(tag=k, simple_value=float(x)) for k, x in values.items()]), step)

    def log_steps(self, rows):
        for step, vals in rows:
            self._add(vals, step)
        self.writer.flush()  # one write per batch of rows: TensorBoard shows them while the epoch runs

    def wants_validation(self, epoch):
        return self.pictures.due(epoch)

    def log_validation(self, epoch, step, sample):
        with self.pictures.timed(epoch):
            self._pictures(epoch, step, sample)

    def log_boxes(self, epoch, step, sample):
        """`val/boxes/<i>`: validation image i with its true (green) and predicted (red) boxes."""
        from torchkiln.loggers.images import boxes_image

        with self.pictures.timed(epoch):
            for i, (image, pred, true) in enumerate(zip(sample.images, sample.predicted, sample.true)):
                self._add_image(f"val/boxes/{i}", boxes_image(image, pred, true, self.class_names), step)

    def _pictures(self, epoch, step, sample):
        from torchkiln.loggers.images import validation_pictures

        for tag, picture in validation_pictures(sample, self.class_names, epoch).items():
            self._add_image(tag, picture, step)

    def _add_image(self, tag: str, image, step: int) -> None:
        """An (H, W, 3) uint8 array as a PNG image event (fast zlib level: these are flat pictures)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        from torchkiln.loggers.images import png_bytes

        h, w = image.shape[:2]
        value = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=png_bytes(image))
        self.events.add_summary(Summary(value=[Summary.Value(tag=tag, image=value)]), step)

    def log_epoch(self, epoch, step, record):
        # Against the global step, like the step scalars: purge_step on resume then drops exactly
        # the rows logged after the checkpoint, epoch rows included. `epoch` is a scalar too.
        self._add({"epoch": epoch, **record}, step)
        if self.histograms and epoch % self.histograms == 0:
            from torch.utils.tensorboard.summary import histogram

            for name, p in self.model.named_parameters():
                self.events.add_summary(histogram(f"weights/{name}", p.detach().float().cpu().numpy(),
                                                  "auto"), step)
            for name, g in (self.taps.grads if self.taps else {}).items():
                if g is not None:
                    self.events.add_summary(histogram(f"grads/{name}", g.detach().float().cpu().numpy(),
                                                      "auto"), step)
        self.writer.flush()

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def finish(self, summary: dict[str, Any]):
        if self.writer is None:
            return
        if self.taps is not None:
            self.taps.remove()
            self.taps = None
        if self.config is not None:
            self._hparams(summary)
        self.writer.close()
        self.writer = None

    def _hparams(self, summary: dict[str, Any]) -> None:
        """The config as hparams, with the best monitored value and the final epoch's metrics."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"hparam/{k}": float(v) for k, v in (summary.get("final") or {}).items()
                   if k.startswith(("train/", "val/"))}
        if summary.get("best") is not None:
            metrics["hparam/best"] = float(summary["best"])
        if not metrics:
            return
        for s in hparams(flat_config(self.config), metrics):
            self.events.add_summary(s)
        self._add(metrics, summary.get("epochs_completed") or 0)
