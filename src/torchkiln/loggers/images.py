"""Validation pictures for TensorBoard and W&B, drawn with PIL straight into an RGB array.

Drawn every epoch, so they must cost about a millisecond, not the ~0.25 s matplotlib takes for
the same two figures (subplots, tick layout, tight_layout, Agg): that alone was 2x the epoch of
the default run. The confusion matrix of plots/ and of `kiln test` is this picture too; the other
PNGs in plots/ are drawn once at the end of a run, with matplotlib (figures.py). Text is rendered
once per distinct string and size, then pasted as a mask.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from torchkiln.loggers.validation import ValidationSample

WHITE = (255, 255, 255)
INK = (30, 30, 30)
RED = (196, 40, 40)
GRID = (210, 210, 210)
# ColorBrewer "Blues", light to dark: the cell colour of a fraction 0..1.
_BLUES = np.array([(247, 251, 255), (222, 235, 247), (198, 219, 239), (158, 202, 225), (107, 174, 214),
                   (66, 146, 198), (33, 113, 181), (8, 81, 156), (8, 48, 107)], dtype=np.float64)


def blues(fraction: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours for fractions in [0, 1] (piecewise-linear through the palette)."""
    x = np.clip(np.asarray(fraction, dtype=np.float64), 0, 1) * (len(_BLUES) - 1)
    lo = np.minimum(np.floor(x).astype(int), len(_BLUES) - 2)
    t = (x - lo)[..., None]
    return np.rint(_BLUES[lo] * (1 - t) + _BLUES[lo + 1] * t).astype(np.uint8)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@lru_cache(maxsize=4096)
def _text_mask(text: str, size: int) -> Image.Image:
    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (max(1, right - min(left, 0)), max(1, bottom)), 0)
    ImageDraw.Draw(mask).text((-min(left, 0), 0), text, fill=255, font=font)
    return mask


def text_size(text: str, size: int) -> tuple[int, int]:
    return _text_mask(text, size).size


def put_text(image: Image.Image, xy: tuple[float, float], text: str, size: int = 12,
             color: tuple[int, int, int] = INK, anchor: str = "lt") -> None:
    """Paste `text` at xy; anchor: l/m/r horizontally, t/m/b vertically (as in PIL)."""
    mask = _text_mask(text, size)
    w, h = mask.size
    x = xy[0] - {"l": 0, "m": w / 2, "r": w}[anchor[0]]
    y = xy[1] - {"t": 0, "m": h / 2, "b": h}[anchor[1]]
    image.paste(color, (int(round(x)), int(round(y))), mask)


def class_label(index: int, class_names: list[str] | None) -> str:
    if class_names and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


def _tile(image: torch.Tensor, side: int) -> Image.Image:
    """One input, min-max scaled (inputs are often normalized), fitted into side x side."""
    x = image.detach().float().cpu()
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    arr = (x * 255).round().to(torch.uint8)
    arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).contiguous().numpy()
    tile = Image.fromarray(arr).convert("RGB")
    h, w = arr.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = scale >= 2  # tiny inputs (digits are 8x8) as crisp blocks, large ones smoothed
    return tile.resize(size, Image.Resampling.NEAREST if small else Image.Resampling.BILINEAR)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of an (H, W, 3) uint8 array at zlib level 1: ~30% faster than the default level and,
    for these flat pictures, about 25% larger (10-15 kB)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def misclassified_image(sample: ValidationSample, class_names: list[str] | None = None,
                        title: str = "", columns: int = 8, side: int = 80) -> np.ndarray | None:
    """(H, W, 3) uint8: a grid of misclassified inputs, each captioned true/pred; None if none."""
    if sample.images is None or not len(sample.images):
        return None
    n = len(sample.images)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    pad, caption, head = 8, 30, 26
    cell_w, cell_h = side + pad, side + caption + pad
    image = Image.new("RGB", (pad + cols * cell_w, head + rows * cell_h), WHITE)
    put_text(image, (image.width / 2, 6), title or "misclassified validation samples", 14, anchor="mt")
    for k in range(n):
        r, c = divmod(k, cols)
        x0, y0 = pad + c * cell_w, head + r * cell_h
        t = class_label(int(sample.image_targets[k]), class_names)
        p = class_label(int(sample.image_preds[k]), class_names)
        put_text(image, (x0 + side / 2, y0), f"true {t}", 11, INK, "mt")
        put_text(image, (x0 + side / 2, y0 + 14), f"pred {p}", 11, RED, "mt")
        tile = _tile(sample.images[k], side)
        image.paste(tile, (x0 + (side - tile.width) // 2, y0 + caption + (side - tile.height) // 2))
    return np.asarray(image)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """An (H, W, 3) uint8 picture written as a PNG file (its folder made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
    return path


def confusion_image(confusion: ValidationSample | torch.Tensor, class_names: list[str] | None = None,
                    title: str = "") -> np.ndarray:
    """(H, W, 3) uint8: the confusion matrix (a validation sample's, or (C, C) counts), cells
    coloured by the fraction of the true class (rows), counts written in them when the cells are
    large enough to hold them. The one picture of a confusion matrix: every epoch's in TensorBoard
    and W&B, plots/ and `kiln test`'s."""
    cm = (confusion.confusion() if isinstance(confusion, ValidationSample) else confusion).numpy()
    c = cm.shape[0]
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    cell = int(np.clip(640 // max(c, 1), 4, 40))
    labelled = c <= 40
    labels = [class_label(i, class_names) for i in range(c)] if labelled else []
    label_w = max((text_size(s, 11)[0] for s in labels), default=0) + 8
    left, top = 24 + label_w, 30 + 18
    width, height = left + c * cell + 12, top + c * cell + 40
    image = Image.new("RGB", (max(width, 260), height), WHITE)
    grid = np.repeat(np.repeat(blues(norm), cell, axis=0), cell, axis=1)
    image.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(image)
    draw.rectangle((left - 1, top - 1, left + c * cell, top + c * cell), outline=GRID)
    put_text(image, (image.width / 2, 6), title or "confusion matrix", 14, anchor="mt")
    put_text(image, (left + c * cell / 2, top - 4), "predicted", 11, anchor="mb")
    put_text(image, (4, top + c * cell / 2), "true", 11, anchor="lm")
    if labelled:
        for i, name in enumerate(labels):
            put_text(image, (left - 4, top + i * cell + cell / 2), name, 11, anchor="rm")
        for j, name in enumerate(labels):
            if text_size(name, 11)[0] <= cell - 4:
                put_text(image, (left + j * cell + cell / 2, top + c * cell + 3), name, 11, anchor="mt")
    if cell >= 18:
        size = 11 if cell >= 26 else 9
        for i, j in zip(*np.nonzero(cm)):
            text = str(int(cm[i, j]))
            if text_size(text, size)[0] <= cell - 2:
                color = WHITE if norm[i, j] > 0.5 else INK
                put_text(image, (left + j * cell + cell / 2, top + i * cell + cell / 2), text, size, color, "mm")
    put_text(image, (left, height - 16), "colour: fraction of the true class (row)", 10, (90, 90, 90))
    return np.asarray(image)


def view_class_names(sample: ValidationSample, class_names: list[str] | dict[str, list[str]] | None
                     ) -> list[str] | None:
    """The names to label a view's classes with: its own, its entry in a dict by head (CsvImages
    `target: heads`), or the run's list for the task's own classes."""
    if sample.class_names:
        return sample.class_names
    if isinstance(class_names, dict):
        names = class_names.get(sample.view)
        return list(names) if names else None
    return class_names if not sample.view else None


def validation_pictures(sample: ValidationSample, class_names: list[str] | dict[str, list[str]] | None,
                        epoch: int) -> dict[str, np.ndarray]:
    """The pictures loggers send for an epoch, by tag: the misclassified grid (when there are
    misclassified image inputs) and the confusion matrix; `val/<head>/...` for a head's view."""
    names = view_class_names(sample, class_names)
    tag = f"val/{sample.view}/" if sample.view else "val/"
    about = f"{sample.view}: " if sample.view else ""
    pictures = {}
    grid = misclassified_image(sample, names, f"{about}misclassified (epoch {epoch})")
    if grid is not None:
        pictures[f"{tag}misclassified"] = grid
    pictures[f"{tag}confusion_matrix"] = confusion_image(sample, names, f"{about}confusion matrix (epoch {epoch})")
    return pictures


GREEN = (40, 170, 60)
BOX_SCORE = 0.3  # predicted boxes drawn: score at least this


def rgb_uint8(image: torch.Tensor) -> torch.Tensor:
    """A detection input (C, H, W) float in [0, 1] as (3, H, W) uint8."""
    x = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]


def shown_boxes(predicted: dict[str, torch.Tensor], max_boxes: int = 20) -> torch.Tensor:
    """Indices of the predicted boxes a picture shows: score >= BOX_SCORE, the `max_boxes` best
    (a detector returns them by descending score)."""
    return (predicted["scores"] >= BOX_SCORE).nonzero().flatten()[:max_boxes]


def boxes_image(image: torch.Tensor, predicted: dict[str, torch.Tensor], true: dict[str, torch.Tensor],
                class_names: list[str] | None = None, max_boxes: int = 20) -> np.ndarray:
    """An (H, W, 3) uint8 picture of one detection input (float, [0, 1]) with its true boxes in green
    and its predicted boxes (score >= BOX_SCORE, the `max_boxes` best) in red, labelled with the
    class name (and score), drawn by torchvision's draw_bounding_boxes."""
    x = rgb_uint8(image)
    keep = shown_boxes(predicted, max_boxes)

    def label(i: int) -> str:
        return class_label(int(i) - 1, class_names) if class_names else str(i)  # 1..C: names[0..C-1]

    drawn = _draw(x, true["boxes"], [label(i) for i in true["labels"].tolist()], GREEN)
    pred_labels = [f"{label(i)} {s:.2f}" for i, s in zip(predicted["labels"][keep].tolist(),
                                                         predicted["scores"][keep].tolist())]
    drawn = _draw(drawn, predicted["boxes"][keep], pred_labels, RED)
    return drawn.permute(1, 2, 0).contiguous().numpy()


def _draw(image: torch.Tensor, boxes: torch.Tensor, labels: list[str], color: tuple[int, int, int]) -> torch.Tensor:
    """draw_bounding_boxes, called only with boxes to draw: an image without true boxes, or a detector
    with none above BOX_SCORE, is common, and torchvision warns on every empty set."""
    if len(boxes) == 0:
        return image
    from torchvision.utils import draw_bounding_boxes

    return draw_bounding_boxes(image, boxes.float(), labels, colors=color, width=1)
