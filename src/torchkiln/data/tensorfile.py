"""Arrays saved to disk (`.npz` or `.pt`): a dataset that lives in tensors, so the fast path applies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from torchkiln.errors import DataError
from torchkiln.registry import DATASETS


@DATASETS.register
class TensorFile(Dataset):
    """Inputs and targets from `x_key` and `y_key` of an `.npz` file or a `.pt` dict of tensors.

    `dtype` converts the inputs (null keeps them). `.pt` files are read with `weights_only=True` (no
    pickled code runs). Integer 1-D targets are class labels (`targets`, `num_classes`); anything
    else (float, 2-D) is passed through as is. Query ids for ranking come from `group_key` (the
    array `qid` when the file has one; a name you give must exist): a sample is then
    (x, y, query id), and `groups` lets splits and batches keep each query whole.
    """

    def __init__(self, path: str, x_key: str = "x", y_key: str | None = "y", dtype: str | None = "float32",
                 group_key: str | None = "qid"):
        self.path = Path(path)
        arrays = self._load()
        if x_key not in arrays:
            raise DataError(f"{self.path}: no array '{x_key}' (found: {', '.join(arrays)}); set x_key")
        x = torch.as_tensor(arrays[x_key])
        if dtype is not None:
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise DataError(f"{self.path}: dtype '{dtype}' is not a torch dtype (e.g. float32, int64)")
            x = x.to(getattr(torch, dtype))
        self.inputs = x
        self.labels_tensor: torch.Tensor | None = None
        self.num_classes: int | None = None
        if y_key is not None:
            if y_key not in arrays:
                raise DataError(f"{self.path}: no array '{y_key}' (found: {', '.join(arrays)}); set y_key")
            y = torch.as_tensor(arrays[y_key])
            if len(y) != len(x):
                raise DataError(f"{self.path}: '{x_key}' has {len(x)} rows but '{y_key}' has {len(y)}")
            if not y.is_floating_point() and not y.is_complex() and y.dim() == 1:
                y = y.to(torch.int64)
                if len(y) and int(y.min()) < 0:
                    raise DataError(f"{self.path}: class label {int(y.min())} is negative in '{y_key}'")
                self.targets = y.numpy()
                self.num_classes = int(y.max()) + 1 if len(y) else 0
                self.classes = [str(i) for i in range(self.num_classes)]
            self.labels_tensor = y
        self.groups: torch.Tensor | None = self._groups(arrays, group_key, len(x))

    def _load(self) -> dict:
        if not self.path.is_file():
            raise DataError(f"{self.path}: tensor file not found (data.dataset.args.path)")
        suffix = self.path.suffix.lower()
        try:
            if suffix == ".npz":
                with np.load(self.path, allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
            if suffix in (".pt", ".pth"):
                obj = torch.load(self.path, map_location="cpu", weights_only=True)
                if not isinstance(obj, dict):
                    raise DataError(f"{self.path}: expected a dict of tensors, found {type(obj).__name__}")
                return obj
        except DataError:
            raise
        except Exception as exc:  # zip/pickle errors differ by version; all mean "unreadable"
            raise DataError(f"{self.path}: cannot read tensor file ({type(exc).__name__}: {exc})") from exc
        raise DataError(f"{self.path}: expected a .npz or .pt file")

    def _groups(self, arrays: dict, key: str | None, n: int) -> torch.Tensor | None:
        if key is None or (key == "qid" and (key not in arrays or self.labels_tensor is None)):
            return None  # the default key is optional
        if key not in arrays:
            raise DataError(f"{self.path}: no array '{key}' (found: {', '.join(arrays)}); set group_key")
        g = torch.as_tensor(arrays[key])
        if g.dim() != 1 or len(g) != n or g.is_floating_point() or g.is_complex():
            raise DataError(f"{self.path}: '{key}' must hold one integer query id per row ({n} rows);"
                            f" found shape {tuple(g.shape)}, {g.dtype}")
        if self.labels_tensor is None:
            raise DataError(f"{self.path}: query ids ('{key}') need relevance targets; set y_key")
        return g.to(torch.int64)

    def fast_tensors(self) -> tuple[torch.Tensor, ...]:
        """Tensors whose rows are the samples: batch = tuple(t[idx] for t in these)."""
        parts = (self.inputs, self.labels_tensor, self.groups)
        return tuple(t for t in parts if t is not None)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        return tuple(t[index] for t in self.fast_tensors())
