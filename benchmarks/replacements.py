"""The hand-written replacements, against the libraries they replaced, on realistic work.

Two of torchkiln's mechanisms replaced a library's own for speed measured on the digits toy (a
0.14 s epoch): its TensorBoard event writer (loggers/events.py, in place of TensorBoard's
`EventFileWriter`, which hands each event to a writer thread; kept below as `EventFile`, since this
measurement removed it from the package) and its confusion-matrix metrics (metrics/confusion.py,
in place of torchmetrics' `MulticlassAccuracy` / `MulticlassF1Score`). The writer went back to
TensorBoard's. The confusion metrics are the default names' again, not for their step time (the
same as torchmetrics' here) but for start-up: on torchkiln's own metric base, a run whose metrics
are all torchkiln's never imports torchmetrics, about 4 s of every `kiln` start on 2 cores
(benchmarks/startup.py).
This script measures what each saves per training step, used as the Trainer uses it, against the
step of real work measured in the same run:

- **the step**: ResNet-18 (torchvision, random weights), AdamW, batch 64 of 64-px JPEGs read from an
  image folder (`image_loading.make_folder`) by a DataLoader with one worker; median ms per step.
  The H200 ResNet-50 steps of benchmarks/gpu_check_h200.md (20.6-33.5 ms) are given beside it.
- **TensorBoard**: one training step's row (loss, grad norm, one LR) per step, written every
  `logging.every_n_steps` (10) steps with a flush, as the LoggerHub hands them to the logger: the
  EventFile against TensorBoard's writer (`torch.utils.tensorboard.SummaryWriter`'s file writer),
  `--steps` steps each. Both files are read back with TensorBoard's EventAccumulator: the same
  scalars at the same steps.
- **metrics**: the default metrics (accuracy, f1_macro) on batch-64 outputs of 10 and 1000
  classes, updated once per 64 batches (the Trainer's MetricBuffer) and computed once per epoch of
  `--batches` batches: torchkiln's ConfusionMetric against torchmetrics' classes (arguments checked,
  as built by default). Same values to 1e-6.

Costs are medians of `--repeats` interleaved rounds, per training step, and as a share of the step.

    python benchmarks/replacements.py [--steps 2000] [--batches 640] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_loading import make_folder  # noqa: E402
from machine import machine, write_results  # noqa: E402

H200_STEP_MS = (20.6, 33.5)  # ResNet-50 batch 64: bf16 + channels_last .. fp32 (gpu_check_h200.md)


def step_ms(folder: Path, steps: int = 12) -> float:
    """Median ms of a ResNet-18 training step on batches read from the JPEG folder."""
    import torchvision
    from torchvision.transforms import v2

    tf = v2.Compose([v2.PILToTensor(), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    ds = torchvision.datasets.ImageFolder(str(folder), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=1, persistent_workers=True)
    model = torchvision.models.resnet18(num_classes=len(ds.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    times: list[float] = []
    while len(times) < steps + 2:
        t0 = time.perf_counter()
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
            if len(times) >= steps + 2:
                break
    return 1000 * statistics.median(times[2:])  # the first two hold the workers' start


# -- TensorBoard ------------------------------------------------------------------------------
def _rows(steps: int) -> list[tuple[int, dict[str, float]]]:
    return [(s, {"train/loss_step": 2.3 / s, "train/grad_norm": 1.0 + 1 / s, "lr/group0": 1e-3})
            for s in range(1, steps + 1)]


class EventFile:
    """torchkiln's own event writer until issue 17 (loggers/events.py, removed on this measurement):
    TFRecord records (length, masked CRC32C, Event proto, masked CRC32C) written on the caller's
    thread into a buffered file, C CRC32C from google-crc32c where installed."""

    def __init__(self, log_dir: Path):
        import socket

        from tensorboard.compat.proto.event_pb2 import Event

        try:
            import google_crc32c

            self._crc = lambda data: google_crc32c.value(bytes(data))
        except ImportError:
            from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as _crc

            self._crc = _crc
        self._event = Event
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.kiln"
        self._file = open(log_dir / name, "wb")
        self.write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _masked(self, data: bytes) -> int:
        x = self._crc(data)
        return ((((x >> 15) | (x << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF

    def write(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(b"".join((header, struct.pack("<I", self._masked(header)), data,
                                   struct.pack("<I", self._masked(data)))))

    def add_summary(self, summary, step: int) -> None:
        self.write(self._event(wall_time=time.time(), summary=summary, step=int(step)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def open_writer(kind: str, log_dir: Path):
    """(add_summary, flush, close) of a new event file: `torchkiln` (the removed EventFile) or
    `tensorboard` (SummaryWriter's file writer, as TensorBoardLogger writes through it)."""
    if kind == "torchkiln":
        writer = EventFile(log_dir)
        return writer.add_summary, writer.flush, writer.close
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    return writer.file_writer.add_summary, writer.flush, writer.close


def write_rows(kind: str, log_dir: Path, rows, every: int) -> None:
    """The step rows as TensorBoardLogger.log_steps writes them: one event per step, a flush per
    `every` rows."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    add, flush, close = open_writer(kind, log_dir)
    for i in range(0, len(rows), every):
        for step, vals in rows[i:i + every]:
            add(Summary(value=[Summary.Value(tag=k, simple_value=float(x)) for k, x in vals.items()]), step)
        flush()
    close()


def picture_ms(kind: str, log_dir: Path, n: int = 10) -> tuple[float, int]:
    """ms per validation-picture event (a 100-class confusion matrix, PNG) through each writer,
    close included (TensorBoard's writer checksums on its thread, in pure Python), and the PNG's
    bytes."""
    import torch.utils.tensorboard  # noqa: F401  (import outside the timing)
    from tensorboard.compat.proto.summary_pb2 import Summary

    from torchkiln.loggers.images import confusion_image, png_bytes

    image = confusion_image(torch.randint(0, 50, (100, 100), generator=torch.Generator().manual_seed(0)))
    value = Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=3,
                          encoded_image_string=png_bytes(image))
    t0 = time.perf_counter()
    add, _, close = open_writer(kind, log_dir)
    for step in range(n):
        add(Summary(value=[Summary.Value(tag="val/confusion_matrix", image=value)]), step)
    close()
    return 1000 * (time.perf_counter() - t0) / n, len(value.encoded_image_string)


def read_images(log_dir: Path) -> list[int]:
    """The steps of the picture events TensorBoard reads back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return [e.step for e in acc.Images("val/confusion_matrix")]


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# -- metrics ----------------------------------------------------------------------------------
def _batches(classes: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(classes)
    out = []
    for _ in range(n):
        y = torch.randint(0, classes, (64,), generator=g)
        logits = torch.randn(64, classes, generator=g) + 2 * torch.nn.functional.one_hot(y, classes)
        out.append((logits, y))
    return out


def build(kind: str, classes: int):
    if kind == "torchkiln":  # as the config's `metrics: [accuracy, f1_macro]` builds them
        from torchkiln.metrics import build_metrics

        return build_metrics(["accuracy", "f1_macro"], classes)
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    parts = {"accuracy": MulticlassAccuracy(classes, average="micro"),
             "f1_macro": MulticlassF1Score(classes, average="macro")}
    return MetricCollection(parts, compute_groups=False)  # as torchkiln built them before


def epoch_metrics(kind: str, classes: int, batches, group: int = 64) -> tuple[float, dict[str, float]]:
    """Seconds for one epoch's metric work as the Trainer does it (one update per `group` batches,
    one compute), and the values."""
    t0 = time.perf_counter()
    metrics = build(kind, classes)
    for i in range(0, len(batches), group):
        part = batches[i:i + group]
        metrics.update(torch.cat([o for o, _ in part]), torch.cat([t for _, t in part]))
    values = {k: float(v) for k, v in metrics.compute().items()}
    return time.perf_counter() - t0, values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000, help="logged training steps per TensorBoard run")
    ap.add_argument("--batches", type=int, default=640, help="batches of 64 per metrics epoch")
    ap.add_argument("--images", type=int, default=512, help="JPEGs in the image folder of the step")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "replacements.md"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-replacements-"))
    step = step_ms(make_folder(tmp / "jpg", "jpg", 64, args.images))

    rows = _rows(args.steps)
    tb: dict[str, list[float]] = {"torchkiln": [], "tensorboard": []}
    same_tb = True
    for r in range(args.repeats):
        read = []
        for kind in tb:
            log_dir = tmp / f"tb-{kind}-{r}"
            t0 = time.perf_counter()
            write_rows(kind, log_dir, rows, 10)
            tb[kind].append((time.perf_counter() - t0) / args.steps)
            read.append(read_scalars(log_dir))
        same_tb &= read[0] == read[1] and len(read[0]["train/loss_step"]) == args.steps

    pictures: dict[str, list[float]] = {"torchkiln": [], "tensorboard": []}
    for r in range(args.repeats):
        for kind in pictures:
            ms, png = picture_ms(kind, tmp / f"pic-{kind}-{r}")
            pictures[kind].append(ms)

    met: dict[tuple[str, int], list[float]] = {}
    diffs = []
    for kind in ("torchkiln", "torchmetrics"):  # imports and first-call costs outside the timing
        epoch_metrics(kind, 10, _batches(10, 2))
    for classes in (10, 1000):
        batches = _batches(classes, args.batches)
        for _ in range(args.repeats):
            vals = {}
            for kind in ("torchkiln", "torchmetrics"):
                s, vals[kind] = epoch_metrics(kind, classes, batches)
                met.setdefault((kind, classes), []).append(s / args.batches)
            diffs += [abs(vals["torchkiln"][k] - vals["torchmetrics"][k]) for k in vals["torchkiln"]]

    def us(v: list[float]) -> float:
        return 1e6 * statistics.median(v)

    lines = [f"# Hand-written replacements against their libraries ({datetime.date.today()})", "",
             f"`python benchmarks/replacements.py --steps {args.steps} --batches {args.batches} --repeats"
             f" {args.repeats}` on {machine()}; torch {torch.__version__}.", "",
             f"The step of real work: ResNet-18 + AdamW, batch 64 of 64-px JPEGs from an image folder,"
             f" one loader worker: **{step:.0f} ms** (median). The H200 ResNet-50 steps of"
             f" gpu_check_h200.md: {H200_STEP_MS[0]}-{H200_STEP_MS[1]} ms.", "",
             "| mechanism | torchkiln (us/step) | library (us/step) | saved per step | share of the CPU step |"
             " share of an H200 step |", "|---|---:|---:|---:|---:|---:|"]
    pairs = [("TensorBoard event writer: a step's row (3 scalars), flushed every 10 steps",
              us(tb["torchkiln"]), us(tb["tensorboard"]))]
    for classes in (10, 1000):
        pairs.append((f"accuracy + f1_macro, {classes} classes: one update per 64 batches, one compute an epoch",
                      us(met[("torchkiln", classes)]), us(met[("torchmetrics", classes)])))
    for name, ours, lib in pairs:
        saved = lib - ours
        lines.append(f"| {name} | {ours:.1f} | {lib:.1f} | {saved:+.1f} us | {saved / (10 * step):+.3f}% |"
                     f" {saved / (10 * H200_STEP_MS[0]):+.3f}% |")
    ours, lib = (statistics.median(pictures[k]) for k in ("torchkiln", "tensorboard"))
    lines += ["", f"A validation picture (a 100-class confusion matrix, a {png // 1024} KiB PNG), one event,"
              f" written once per validated epoch (not per step): {ours:.2f} ms through the EventFile,"
              f" {lib:.2f} ms through TensorBoard's writer (its pure-Python checksum, on its own thread):"
              f" {lib - ours:+.2f} ms an epoch, {100 * (lib - ours) / step:.1f}% of one CPU step."]
    lines += ["", f"Same output: TensorBoard scalars read back equal: **{same_tb}**; metric values' largest"
              f" difference: **{max(diffs):.2e}**.", "",
              "Rule (issue 17): a replacement stays only where it saves several percent of real work. The"
              " writer saves a fraction of a percent and went back to TensorBoard's. The confusion metrics"
              " cost per step what torchmetrics' classes cost; they are the default names' for start-up:"
              " with them a run never imports torchmetrics (benchmarks/startup.py)."]
    write_results(lines, args.out)


if __name__ == "__main__":
    main()
