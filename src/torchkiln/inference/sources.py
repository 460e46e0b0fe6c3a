"""What `kiln predict` reads: a folder of images (recursively), a CSV of image paths (no label column
needed), or a run's own split (`split:test`, `split:val`). Every source is a Dataset of
`{"input", "index"}` samples in input order with an id per input; an image that cannot be read is a
sample with `input` None and its error, so that the one decision about it (stop, or write an empty
row) is made in the main process, also with loader workers.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from torchkiln.data.collate import same_size
from torchkiln.data.images import IMAGE_EXTENSIONS, decode_image
from torchkiln.errors import DataError, did_you_mean

SPLIT_PREFIX = "split:"


@dataclass
class Source:
    dataset: Dataset  # samples {"input", "index"} (and "error" for an unreadable input)
    ids: list[str]
    where: str  # what was read, for messages


class ImageInputs(Dataset):
    """Image files decoded (mode RGB or L) and passed through the eval pipeline."""

    def __init__(self, paths: list[Path], where: list[str], mode: str, transform: Callable | None):
        self.paths, self.where, self.mode, self.transform = paths, where, mode, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = decode_image(self.paths[index], self.mode, where=self.where[index])
        except DataError as exc:
            return {"input": None, "index": index, "error": str(exc).split("; fix")[0]}
        x = self.transform(image) if self.transform is not None else image
        return {"input": x.as_subclass(torch.Tensor), "index": index, "size": torch.tensor(image.shape[-2:]),
                "file": f"{self.paths[index]}{self.where[index]}"}


class SplitInputs(Dataset):
    """A run's split (already with its eval transforms): the inputs without their targets."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        x = sample["input"] if isinstance(sample, dict) else sample[0] if isinstance(sample, (tuple, list)) else sample
        return {"input": torch.as_tensor(x), "index": index}


# inputs of several sizes after the run's eval transforms (data/collate.py:same_size says which)
SIZE_FIX = ("give images of one size, or train with a Resize/CenterCrop in data.transforms.eval"
            " (the run's eval transforms come before the batch)")


def collate(samples: list[dict[str, Any]], stack: bool = True) -> dict[str, Any]:
    """The readable inputs stacked (a list with `stack` False: images of any size), their positions,
    their stored (H, W) when known, and the (position, error) of the others."""
    good = [s for s in samples if s["input"] is not None]
    inputs = [s["input"] for s in good]
    names = [s["file"] for s in good] if all("file" in s for s in good) else None
    return {
        "input": (same_size(inputs, SIZE_FIX, names) if stack else inputs) if good else None,
        "index": torch.tensor([s["index"] for s in good], dtype=torch.int64),
        "size": torch.stack([s["size"] for s in good]) if good and all("size" in s for s in good) else None,
        "failed": [(s["index"], s["error"]) for s in samples if s["input"] is None],
    }


def image_folder(root: Path, mode: str, transform: Callable | None) -> Source:
    """Every image under `root` (recursively, sorted); its id is its path relative to `root`."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"{root}: no image files in this folder ({', '.join(IMAGE_EXTENSIONS)})")
    ids = [p.relative_to(root).as_posix() for p in paths]
    return Source(ImageInputs(paths, [""] * len(paths), mode, transform), ids, str(root))


def image_csv(path: Path, image_col: str, id_col: str | None, root: Path | None, mode: str,
              transform: Callable | None) -> Source:
    """A CSV's rows in order: images at `image_col` (relative to `root`, default the CSV's folder);
    the id is the `id_col` column when the CSV has one, else the image column's value."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if image_col not in header:
            raise DataError(f"{path}: no column '{image_col}'{did_you_mean(image_col, header)} (columns:"
                            f" {', '.join(header)}); name the image column with --image-col")
        rows = [(reader.line_num, r) for r in reader]
    if not rows:
        raise DataError(f"{path}: the CSV has a header but no rows")
    base = root if root is not None else path.parent
    paths = [Path(r[image_col]) if Path(r[image_col]).is_absolute() else base / r[image_col] for _, r in rows]
    key = id_col if id_col is not None and id_col in header else image_col
    ids = [r[key] for _, r in rows]
    where = [f" ({path.name} line {n})" for n, _ in rows]
    return Source(ImageInputs(paths, where, mode, transform), ids, str(path))


def split_source(dataset: Dataset, split: str) -> Source:
    """A run's split; ids are the files' paths relative to the data set's root (image data sets), else
    the positions in the split."""
    from torchkiln.data.wrappers import has_attr, unwrap

    inner, index = unwrap(dataset, has_attr("items"))
    items = getattr(inner, "items", None)
    root = getattr(inner, "root", None)
    n = len(dataset)  # type: ignore[arg-type]
    if items is not None and root is not None:
        picked = index if index is not None else range(n)
        ids = [_relative(items[int(j)].path, Path(root)) for j in picked]
    else:
        ids = [str(i) for i in range(n)]
    return Source(SplitInputs(dataset), ids, f"{SPLIT_PREFIX}{split}")


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()
