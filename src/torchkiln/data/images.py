"""Image files on disk: one folder per class (`ImageFolder`) or a CSV of paths and labels (`CsvImages`).

Files are listed and checked cheaply when the dataset is built (missing, empty, unknown label);
pixels are decoded lazily in `__getitem__`. With `on_error: raise` (the default) the first
broken input ends the run with one line naming the file (and CSV line). With `on_error: skip`
the inputs found broken at build time are dropped and listed in `skipped`; a file that fails to
decode later raises `BrokenInput`, which the split's `SkipBroken` (data/skipping.py) turns into
a deterministic skip, listed in `skip_log`. More than `max_skipped` (a fraction) broken fails.

Samples are `(image, target)` with `image` a uint8 `tv_tensors.Image` (C, H, W); the data
builder appends `ToDtype(float32, scale=True)` to the configured transforms.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from torchkiln.data.skipping import BrokenInput, SkipLog
from torchkiln.errors import DataError
from torchkiln.registry import DATASETS

log = logging.getLogger("torchkiln")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
OnError = Literal["raise", "skip"]


@dataclass
class Item:
    path: Path
    target: Any
    where: str = ""  # e.g. " (labels.csv line 12)"


# Decoded by TorchCodec (libjpeg-turbo, libpng, libwebp: the same pixels as Pillow's RGB
# conversion in a fraction of the time; benchmarks/image_loading.py); other formats by Pillow.
CODEC_DECODED = (".jpg", ".jpeg", ".png", ".webp")


def decode_image(path: Path, mode: str = "RGB", max_pixels: int | None = None, where: str = "") -> Any:
    """Open, size-check and fully decode one image; any failure is a BrokenInput (a DataError)
    naming the file. The size check reads the header only, before any pixel is decoded: `max_pixels`
    and Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) hold for either decoder."""
    from PIL import Image, UnidentifiedImageError

    try:
        if mode == "RGB" and path.suffix.lower() in CODEC_DECODED and _codec_decoder() is not None:
            pixels = _decode_bytes(path, max_pixels, where)
            if pixels is not None:
                return _as_image(pixels)
        with Image.open(path) as im:
            _check_size(path, where, im.width, im.height, max_pixels)
            pixels = _pil_pixels(im, mode)  # forces the full decode: truncation shows up here
    except DataError:
        raise
    except FileNotFoundError:
        _broken(path, where, "image file not found")
    except Image.DecompressionBombError as exc:
        _broken(path, where, f"image exceeds Pillow's decompression-bomb limit ({exc})")
    except UnidentifiedImageError:
        _broken(path, where, "not a readable image (unknown format or corrupt header)")
    except (OSError, SyntaxError, ValueError, RuntimeError) as exc:
        _broken(path, where, f"cannot decode image ({str(exc).strip().splitlines()[-1] if str(exc).strip() else exc})")
    return _as_image(pixels)


def _decode_bytes(path: Path, max_pixels: int | None, where: str) -> torch.Tensor | None:
    """TorchCodec's RGB uint8 (3, H, W) from the file's bytes, read once. The size comes from the
    PNG or JPEG header in them (Pillow's parse of the same header cost as much as a 32 px PNG's
    decode; benchmarks/image_loading.py), or from Pillow's parse of those bytes for the rest (WebP,
    a JPEG whose header this does not read). None for a 16-bit PNG, which Pillow converts its own
    way."""
    from PIL import Image

    with open(path, "rb") as f:
        data = bytearray(f.read())  # writable: torch.frombuffer shares it without a warning
    if data[:8] == _PNG and len(data) > 24 and data[24] == 16:  # IHDR bit depth
        return None
    size = header_size(data)
    if size is None:
        with Image.open(io.BytesIO(data)) as im:  # the header only; raises on what is not an image
            size = im.size
    _check_size(path, where, size[0], size[1], max_pixels)
    pixels = _codec_decoder()(torch.frombuffer(data, dtype=torch.uint8), mode="RGB", output_dtype="auto")
    return pixels if pixels.dtype == torch.uint8 and pixels.dim() == 3 else None


_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, extended, progressive, lossless...; not DHT/JPG/DAC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def header_size(data: bytes | bytearray) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's start-of-frame segment; None for anything
    else (another format, a header cut short or malformed)."""
    if data[:8] == _PNG:
        if data[12:16] != b"IHDR" or len(data) < 24:
            return None
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        if marker in _SOF:
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before it
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _check_size(path: Path, where: str, width: int, height: int, max_pixels: int | None) -> None:
    from PIL import Image

    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        _broken(path, where, f"image is {width}x{height}, above max_pixels={max_pixels}")
    bomb = Image.MAX_IMAGE_PIXELS
    if bomb is not None and pixels > 2 * bomb:  # where Pillow's own open raises
        _broken(path, where, f"image exceeds Pillow's decompression-bomb limit ({pixels} pixels, above"
                f" twice Image.MAX_IMAGE_PIXELS={bomb})")


def _pil_pixels(im: Any, mode: str) -> torch.Tensor:
    """Pillow's pixels, turned upright by the EXIF orientation as TorchCodec turns a JPEG (the
    same pixels from both decoders; a phone photo shows as it was taken)."""
    from PIL import ImageOps
    from torchvision.transforms.v2.functional import pil_to_tensor

    if im.getexif().get(0x0112, 1) != 1:  # Orientation
        im = ImageOps.exif_transpose(im)
    return pil_to_tensor(im.convert(mode))


def _as_image(pixels: torch.Tensor) -> Any:
    from torchvision import tv_tensors

    return tv_tensors.Image(pixels)


@functools.cache
def _codec_decoder() -> Any:
    """TorchCodec's decode_image, looked up once per process (None where it is not installed: a
    failed import searches the whole path again, which is not a cost to pay per image)."""
    try:
        from torchcodec.decoders import decode_image
    except ImportError:
        return None
    return decode_image


def _broken(path: Path, where: str, what: str) -> None:
    reason = f"{path}{where}: {what}"
    raise BrokenInput(f"{reason}; fix or remove the file, or set data.on_error: skip", str(path), reason)


class ImageFiles(Dataset):
    """Shared machinery: a checked list of (path, target) items decoded lazily."""

    decodes_images = True

    def __init__(self, mode: str = "RGB", on_error: OnError = "raise", max_skipped: float = 0.01,
                 max_pixels: int | None = None):
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error: expected raise or skip; found {on_error!r}")
        self.mode = mode
        self.on_error = on_error
        self.max_skipped = float(max_skipped)
        self.max_pixels = max_pixels
        self.items: list[Item] = []
        self.skipped: list[tuple[str, str]] = []  # (file, reason), found when the data set is built
        self.skip_log: SkipLog | None = None  # on_error: skip: those, then those found while reading

    def _problem(self, message: str, item_path: Path | str) -> None:
        """A broken input: raise at once, or remember it when skipping."""
        if self.on_error == "raise":
            raise DataError(f"{message}; fix it, or set data.on_error: skip")
        self.skipped.append((str(item_path), message))

    def _check_files(self, items: list[Item], source: str) -> list[Item]:
        """Cheap checks for every file (it exists, it is not empty); nothing is decoded here: with
        on_error: skip, a file that fails to decode is skipped when it is read (data/skipping.py)."""
        good: list[Item] = []
        for it in items:
            try:
                size = os.stat(it.path).st_size
            except FileNotFoundError:
                self._problem(f"{it.path}{it.where}: image file not found", it.path)
                continue
            if size == 0:
                self._problem(f"{it.path}{it.where}: image file is empty (0 bytes)", it.path)
                continue
            good.append(it)
        total = len(good) + len(self.skipped)
        if not good:
            raise DataError(f"{source}: no usable images ({len(self.skipped)} broken)")
        if self.skipped:
            frac = len(self.skipped) / total
            first = self.skipped[0][1]
            if frac > self.max_skipped:
                raise DataError(f"{source}: {len(self.skipped)} of {total} inputs are broken ({frac:.1%}, above"
                                f" data.max_skipped={self.max_skipped:g}); first: {first}")
            log.warning("%s: skipped %d of %d broken inputs (listed in skipped_files.txt); first: %s",
                        source, len(self.skipped), total, first)
        if self.on_error == "skip":
            self.skip_log = SkipLog(source, [str(it.path) for it in good], self.max_skipped, self.skipped)
        return good

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        it = self.items[index]
        return decode_image(it.path, self.mode, self.max_pixels, it.where), self._target(it.target)

    def _target(self, target: Any) -> Any:
        return target


@DATASETS.register
class ImageFolder(ImageFiles):
    """`root/<class>/<image>`: classes are the sorted folder names (or `classes`, in that order)."""

    def __init__(self, root: str, classes: list[str] | None = None, extensions: Sequence[str] | None = None,
                 mode: str = "RGB", on_error: OnError = "raise", max_skipped: float = 0.01,
                 max_pixels: int | None = None):
        super().__init__(mode, on_error, max_skipped, max_pixels)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found (data.dataset.args.root)")
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in (extensions or IMAGE_EXTENSIONS))
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"{self.root}: no class folders; expected root/<class>/<image files>")
        self.classes = [str(c) for c in classes] if classes is not None else folders
        index = {c: i for i, c in enumerate(self.classes)}
        items: list[Item] = []
        for folder in folders:
            files = sorted(p for p in (self.root / folder).rglob("*") if p.suffix.lower() in exts)
            if folder not in index:
                for p in files:
                    self._problem(f"{p}: label '{folder}' (its folder) is not in the class list"
                                  f" {self.classes}", p)
                continue
            items += [Item(p, index[folder]) for p in files]
        self.items = self._check_files(items, str(self.root))
        self.targets = np.asarray([it.target for it in self.items], dtype=np.int64)
        self.num_classes = len(self.classes)


@DATASETS.register
class CsvImages(ImageFiles):
    """A CSV with an image path column and label column(s).

    target: `class` (one column of class names), `multilabel` (one column of `label_sep`-separated
    names, or several 0/1 columns), `regression` (one or more numeric columns), `heads` (several
    class columns; the target is a dict column -> class index). Paths are relative to `root`
    (default: the CSV's folder). `label_col: null` gives unlabelled samples `(image,)`.
    """

    def __init__(self, csv_file: str, root: str | None = None, image_col: str = "image",
                 label_col: str | list[str] | None = "label",
                 target: Literal["class", "multilabel", "regression", "heads"] = "class",
                 classes: list[str] | dict[str, list[str]] | None = None, label_sep: str = " ",
                 mode: str = "RGB", on_error: OnError = "raise", max_skipped: float = 0.01,
                 max_pixels: int | None = None):
        super().__init__(mode, on_error, max_skipped, max_pixels)
        self.csv_file = Path(csv_file)
        self.root = Path(root) if root is not None else self.csv_file.parent
        self.target_kind = target
        self.label_sep = label_sep
        rows = self._read_rows(image_col, label_col)
        cols = [label_col] if isinstance(label_col, str) else list(label_col or [])
        self.label_cols = cols
        self.classes: Any = None
        self.num_classes: int | None = None
        if label_col is None:
            items = [Item(self._path(r[image_col]), None, where) for where, r in rows]
        elif target == "class":
            self.classes = self._class_list(classes, [r[cols[0]] for _, r in rows])
            items = self._class_items(rows, image_col, cols[0], self.classes)
            self.num_classes = len(self.classes)
        elif target == "heads":
            given = classes if isinstance(classes, dict) else {}
            self.classes = {c: self._class_list(given.get(c), [r[c] for _, r in rows]) for c in cols}
            items = self._heads_items(rows, image_col, cols)
        elif target == "multilabel":
            items = self._multilabel_items(rows, image_col, cols, classes)
            self.num_classes = len(self.classes)
        elif target == "regression":
            items = self._regression_items(rows, image_col, cols)
        else:
            raise DataError(f"{self.csv_file}: target must be class, multilabel, regression or heads;"
                            f" found {target!r}")
        self.items = self._check_files(items, str(self.csv_file))
        if target == "class" and label_col is not None:
            self.targets = np.asarray([it.target for it in self.items], dtype=np.int64)
        if target == "heads" and label_col is not None:  # read without decoding (balanced weights, stats)
            self.head_targets = {c: np.asarray([it.target[c] for it in self.items], dtype=np.int64) for c in cols}
        if target == "multilabel" and label_col is not None:
            self.label_matrix = np.stack([it.target for it in self.items])

    # -- reading ------------------------------------------------------------------------------
    def _read_rows(self, image_col: str, label_col: str | list[str] | None) -> list[tuple[str, dict]]:
        if not self.csv_file.is_file():
            raise DataError(f"{self.csv_file}: CSV file not found (data.dataset.args.csv_file)")
        with open(self.csv_file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            wanted = [image_col] + ([label_col] if isinstance(label_col, str) else list(label_col or []))
            for col in wanted:
                if col not in header:
                    from torchkiln.errors import did_you_mean

                    raise DataError(f"{self.csv_file}: no column '{col}'{did_you_mean(col, header)}"
                                    f" (columns: {', '.join(header)})")
            name = self.csv_file.name
            rows = [(f" ({name} line {reader.line_num})", row) for row in reader]
        if not rows:
            raise DataError(f"{self.csv_file}: the CSV has a header but no rows")
        return rows

    def _path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.root / p

    @staticmethod
    def _class_list(given: list[str] | None, values: list[str]) -> list[str]:
        if given is not None:
            return [str(c) for c in given]
        found = {v.strip() for v in values if v is not None and v.strip()}
        try:
            return sorted(found, key=float)
        except ValueError:
            return sorted(found)

    def _label(self, value: str | None, classes: list[str], path: Path, where: str) -> int | None:
        v = (value or "").strip()
        if v not in classes:
            shown = classes if len(classes) <= 12 else classes[:12] + ["..."]
            what = "empty label" if not v else f"label '{v}' is not in the class list {shown}"
            self._problem(f"{path}{where}: {what}", path)
            return None
        return classes.index(v)

    def _class_items(self, rows, image_col: str, col: str, classes: list[str]) -> list[Item]:
        lookup = {c: i for i, c in enumerate(classes)}
        items = []
        for where, r in rows:
            path = self._path(r[image_col])
            v = (r[col] or "").strip()
            if v in lookup:
                items.append(Item(path, lookup[v], where))
            else:
                self._label(v, classes, path, where)
        return items

    def _heads_items(self, rows, image_col: str, cols: list[str]) -> list[Item]:
        items = []
        for where, r in rows:
            path = self._path(r[image_col])
            labels = {c: self._label(r[c], self.classes[c], path, where) for c in cols}
            if all(v is not None for v in labels.values()):
                items.append(Item(path, labels, where))
        return items

    def _multilabel_items(self, rows, image_col: str, cols: list[str], classes) -> list[Item]:
        items = []
        if len(cols) > 1:  # one 0/1 column per class
            self.classes = list(cols)
            for where, r in rows:
                path = self._path(r[image_col])
                try:
                    vec = np.asarray([float(r[c]) for c in cols], dtype=np.float32)
                except (TypeError, ValueError):
                    self._problem(f"{path}{where}: multilabel columns must hold 0 or 1", path)
                    continue
                items.append(Item(path, vec, where))
            return items
        col = cols[0]
        split = [[t for t in (r[col] or "").split(self.label_sep) if t.strip()] for _, r in rows]
        self.classes = self._class_list(classes, [t.strip() for tags in split for t in tags])
        lookup = {c: i for i, c in enumerate(self.classes)}
        for (where, r), tags in zip(rows, split):
            path = self._path(r[image_col])
            unknown = [t for t in tags if t.strip() not in lookup]
            if unknown:
                self._problem(f"{path}{where}: label '{unknown[0].strip()}' is not in the class list", path)
                continue
            vec = np.zeros(len(self.classes), dtype=np.float32)
            vec[[lookup[t.strip()] for t in tags]] = 1.0
            items.append(Item(path, vec, where))
        return items

    def _regression_items(self, rows, image_col: str, cols: list[str]) -> list[Item]:
        items = []
        for where, r in rows:
            path = self._path(r[image_col])
            try:
                vals = [float(r[c]) for c in cols]
            except (TypeError, ValueError):
                self._problem(f"{path}{where}: regression target {[r[c] for c in cols]} is not a number", path)
                continue
            items.append(Item(path, vals[0] if len(vals) == 1 else vals, where))
        return items

    # -- samples --------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> tuple[Any, ...]:
        it = self.items[index]
        image = decode_image(it.path, self.mode, self.max_pixels, it.where)
        if it.target is None:
            return (image,)
        return image, self._target(it.target)

    def _target(self, target: Any) -> Any:
        kind = self.target_kind
        if kind == "class":
            return torch.tensor(target, dtype=torch.int64)
        if kind == "heads":
            return {c: torch.tensor(v, dtype=torch.int64) for c, v in target.items()}
        return torch.as_tensor(target, dtype=torch.float32)
