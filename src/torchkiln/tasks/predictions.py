"""How a task's scores become the rows of a prediction file (`kiln predict`, `Predictor.predict`).

A task chooses its writer in `Task.prediction_writer(options)`; the writer turns one batch of
scores (`Task.scores(outputs)`, on the CPU) into rows. Everything about the file (input order,
broken inputs, the atomic write, the rows/s) is `inference/output.py`'s, so a new task only says
what its columns are:

- `header()`: the column names, the id column first;
- `rows(ids, scores)`: the rows of a batch, as one list of rows per input (one row for
  classification; a detection writer may give one per box, or none);
- `empty_rows(id)`: the rows of an input that could not be read (`--on-error skip`);
- `finish(out)`: extra files written beside the CSV at the end (e.g. a COCO results JSON), as paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class PredictOptions:
    id_col: str = "id"
    pred_col: str = "pred"
    probs: bool = False  # a probability column per class (label)
    topk: int | None = None  # the K most probable classes, with their probabilities
    class_names: Any = None  # list (classes, labels) or dict head -> list (multihead), or None
    num_classes: int | None = None  # the model's class (label) count
    coco_ann: str | None = None  # detection: a COCO file whose image and category ids the results JSON uses


def _fmt(value: float) -> str:
    return f"{value:.6g}"


class PredictionWriter:
    """Rows for a task whose scores are one value or one row of values per input (the fallback)."""

    def __init__(self, options: PredictOptions, width: int | None = None):
        self.options = options
        self.width = width  # values per input; None: known from the first batch

    def header(self) -> list[str]:
        o = self.options
        if self.width is None or self.width == 1:
            return [o.id_col, o.pred_col]
        return [o.id_col, *(f"{o.pred_col}_{i}" for i in range(self.width))]

    def rows(self, ids: list[str], scores: Any) -> list[list[list[Any]]]:
        values = torch.as_tensor(scores).float().reshape(len(ids), -1)
        self.width = int(values.shape[1]) if self.width is None else self.width
        return [[[i, *map(_fmt, v.tolist())]] for i, v in zip(ids, values)]

    def empty_rows(self, id_: str) -> list[list[Any]]:
        return [[id_, *[""] * (len(self.header()) - 1)]]

    def finish(self, out: Path) -> list[Path]:
        return []

    @property
    def needs_first_batch(self) -> bool:
        """True while the header depends on the scores' width (known after the first batch)."""
        return self.width is None


def _names(names: Any, n: int) -> list[str]:
    return [str(c) for c in names] if isinstance(names, list) and len(names) == n else [str(i) for i in range(n)]


def _topk_cells(probs: torch.Tensor, k: int, names: list[str]) -> list[list[str]]:
    values, index = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[cell for j, p in zip(ix.tolist(), vs.tolist()) for cell in (names[j], _fmt(p))]
            for vs, ix in zip(values, index)]


def _topk_header(k: int) -> list[str]:
    return [c for i in range(1, k + 1) for c in (f"top{i}", f"top{i}_prob")]


class ClassWriter(PredictionWriter):
    """id, the class name (and its index, unless the names are the indices), then with `probs` one
    `prob_<class>` column per class and with `topk` K `topI, topI_prob` pairs."""

    def __init__(self, options: PredictOptions, num_classes: int):
        super().__init__(options, num_classes)
        self.names = _names(options.class_names, num_classes)
        self.with_index = self.names != [str(i) for i in range(num_classes)]

    def header(self) -> list[str]:
        o = self.options
        cols = [o.id_col, o.pred_col] + ([f"{o.pred_col}_index"] if self.with_index else [])
        cols += [f"prob_{c}" for c in self.names] if o.probs else []
        return cols + (_topk_header(min(o.topk, self.width)) if o.topk else [])

    def rows(self, ids: list[str], scores: torch.Tensor) -> list[list[list[Any]]]:
        probs = scores.float()
        pred = probs.argmax(dim=1).tolist()
        topk = _topk_cells(probs, self.options.topk, self.names) if self.options.topk else None
        out = []
        for n, (id_, p) in enumerate(zip(ids, pred)):
            row = [id_, self.names[p]] + ([p] if self.with_index else [])
            row += list(map(_fmt, probs[n].tolist())) if self.options.probs else []
            out.append([row + (topk[n] if topk else [])])
        return out


class MultiLabelWriter(PredictionWriter):
    """id, the positive labels (space-separated), then with `probs` one `prob_<label>` per label."""

    def __init__(self, options: PredictOptions, num_labels: int, threshold: float):
        super().__init__(options, num_labels)
        self.names = _names(options.class_names, num_labels)
        self.threshold = threshold

    def header(self) -> list[str]:
        o = self.options
        cols = [o.id_col, o.pred_col] + ([f"prob_{c}" for c in self.names] if o.probs else [])
        return cols + (_topk_header(min(o.topk, self.width)) if o.topk else [])

    def rows(self, ids: list[str], scores: torch.Tensor) -> list[list[list[Any]]]:
        probs = scores.float()
        topk = _topk_cells(probs, self.options.topk, self.names) if self.options.topk else None
        out = []
        for n, id_ in enumerate(ids):
            row = [id_, " ".join(self.names[j] for j in (probs[n] >= self.threshold).nonzero().flatten().tolist())]
            row += list(map(_fmt, probs[n].tolist())) if self.options.probs else []
            out.append([row + (topk[n] if topk else [])])
        return out


class MultiHeadWriter(PredictionWriter):
    """id, one column per head (its class name, or index), then the combined class (mixed radix
    over the heads in order: mask*6 + gender*3 + age for heads of 3, 2 and 3) under `pred_col`;
    with `probs` one `<head>_prob_<class>` column per head and class; with `topk` the K most probable
    combined classes (their probability is the product of the heads')."""

    def __init__(self, options: PredictOptions, task: Any):
        super().__init__(options, task.num_combined)
        self.task = task
        given = options.class_names if isinstance(options.class_names, dict) else {}
        self.names = {h: _names(spec.names or given.get(h), spec.classes) for h, spec in task.heads.items()}

    def header(self) -> list[str]:
        o = self.options
        cols = [o.id_col, *self.task.heads, *([o.pred_col] if self.task.combined else [])]
        cols += [f"{h}_prob_{c}" for h, names in self.names.items() for c in names] if o.probs else []
        return cols + (_topk_header(min(o.topk, self.width)) if o.topk and self.task.combined else [])

    def rows(self, ids: list[str], scores: dict[str, torch.Tensor]) -> list[list[list[Any]]]:
        heads = {h: scores[h].float() for h in self.task.heads}
        preds = {h: p.argmax(dim=1) for h, p in heads.items()}
        combined = self.task.encode(preds).tolist() if self.task.combined else None
        topk = None
        if self.options.topk and self.task.combined:
            joint = self.task.combined_probs(heads)
            topk = _topk_cells(joint, self.options.topk, [str(i) for i in range(joint.shape[1])])
        out = []
        for n, id_ in enumerate(ids):
            row = [id_, *(self.names[h][int(preds[h][n])] for h in heads)]
            row += [combined[n]] if combined is not None else []
            row += [_fmt(v) for h in heads for v in heads[h][n].tolist()] if self.options.probs else []
            out.append([row + (topk[n] if topk else [])])
        return out


class DetectionWriter(PredictionWriter):
    """One row per box: the image's id (`image` unless `--id-col` names it), x1, y1, x2, y2 in the
    image's pixels, the class name and the score; an image without boxes has no row. `finish` writes
    the COCO results JSON beside the CSV (`<out stem>.coco.json`, see `coco_ids`)."""

    def __init__(self, options: PredictOptions):
        super().__init__(options, 7)
        self.names = options.class_names if isinstance(options.class_names, list) else None
        self.records: list[dict[str, Any]] = []

    def header(self) -> list[str]:
        id_col = "image" if self.options.id_col == "id" else self.options.id_col
        return [id_col, "x1", "y1", "x2", "y2", "label", "score"]

    def rows(self, ids: list[str], scores: list[dict[str, torch.Tensor]]) -> list[list[list[Any]]]:
        from torchkiln.data.detection.writers import box_rows

        out = []
        for id_, det in zip(ids, scores, strict=True):
            record = {"file": id_, "boxes": det["boxes"], "labels": det["labels"], "scores": det["scores"]}
            self.records.append(record)
            out.append(box_rows(record, self.names))
        return out

    def finish(self, out: Path) -> list[Path]:
        from torchkiln.data.detection.writers import write_coco_results

        image_ids, category_ids = coco_ids(self.options.coco_ann, [r["file"] for r in self.records], self.names)
        for record, image_id in zip(self.records, image_ids):
            record["image_id"] = image_id
        path = out.with_name(f"{out.stem}.coco.json")
        write_coco_results(self.records, path, category_ids)
        return [path]


def coco_ids(coco_ann: str | None, files: list[str], names: list[str] | None
             ) -> tuple[list[int], list[int] | None]:
    """The COCO results' image ids (one per file) and category ids (label i -> category_ids[i - 1];
    None: the label itself). Without `coco_ann`: the input's position (1-based) and the label. With
    it: the image entry whose file_name is the file (or its base name), and the category of the
    class's name."""
    if coco_ann is None:
        return list(range(1, len(files) + 1)), None
    from torchkiln.data.detection.audit import read_annotations
    from torchkiln.errors import DataError

    data = read_annotations(coco_ann)  # a COCO JSON or a boxes CSV, as `kiln train` reads them
    try:
        by_name = {str(im["file_name"]): int(im["id"]) for im in data["images"]}
        categories = {str(c["name"]): int(c["id"]) for c in data["categories"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"--coco-ann {coco_ann}: an image or category entry without file_name/name and id"
                        f" ({type(exc).__name__}: {exc}); give the annotations the run was trained on") from None
    base = {Path(k).name: v for k, v in by_name.items()}
    image_ids = []
    for f in files:
        found = by_name.get(f, base.get(Path(f).name))
        if found is None:
            raise DataError(f"--coco-ann {coco_ann}: no image entry with file_name {f}; predict the images"
                            " the file lists, or leave --coco-ann out (ids are then positions)")
        image_ids.append(found)
    missing = [c for c in names or [] if c not in categories]
    if missing:
        raise DataError(f"--coco-ann {coco_ann}: no category named {missing[0]} (the run's classes:"
                        f" {', '.join(names or [])})")
    return image_ids, [categories[c] for c in names or []]
