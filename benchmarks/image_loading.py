"""Images per second through the training loader: torchvision's ImageFolder (Pillow) against
torchkiln's ImageFolder and CsvImages, on JPEG and PNG folders, with the same transforms.

Each folder holds `--images` smooth-noise pictures (JPEG quality 90, or PNG) of one size, in four
classes. Every variant reads one epoch through a DataLoader (batch 64, shuffled, the given
workers) with the same transforms: a horizontal flip, then float32 scaled to [0, 1].

- `torchvision`: `torchvision.datasets.ImageFolder` (Pillow's loader), v2 transforms on the PIL image.
- `torchkiln`: `ImageFolder` built as `kiln train` builds it (`build_data` / `build_loaders`),
  decoding with TorchCodec where it is used (data/images.py: CODEC_DECODED), Pillow for the rest.
- `torchkiln, Pillow`: the same, with every format decoded by Pillow (the decoder alone).
- `torchkiln CsvImages`: the same files listed in a CSV.

A decoder table first: one image decoded `--decode-repeats` times by Pillow (open, convert to
RGB, to a tensor) and by TorchCodec, on one thread; the columns say which is faster per format.
Images/s are medians of `--repeats` interleaved rounds.

    python benchmarks/image_loading.py [--sizes 32,224] [--images 512] [--workers 0,1,2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine, write_results  # noqa: E402

FORMATS = {"jpg": ("JPEG", {"quality": 90}), "png": ("PNG", {})}


def make_folder(root: Path, ext: str, size: int, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(size)
    fmt, options = FORMATS[ext]
    rows = ["image,label"]
    for i in range(n):
        coarse = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)  # photo-like, compressible
        cls = f"c{i % 4}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        image.save(root / cls / f"{i}.{ext}", fmt, **options)
        rows.append(f"{cls}/{i}.{ext},{cls}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _transforms():
    from torchvision.transforms import v2

    return [v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]


def torchvision_epoch(root: Path, workers: int) -> tuple[float, int]:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    t0 = time.perf_counter()
    ds = ImageFolder(str(root), transform=v2.Compose([v2.ToImage(), *_transforms()]))
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=workers)
    seen = sum(len(batch[0]) for batch in loader)
    return time.perf_counter() - t0, seen


def torchkiln_epoch(root: Path, workers: int, csv: bool = False, pillow: bool = False) -> tuple[float, int]:
    from torchkiln.config.build import build_data, build_loaders
    from torchkiln.config.load import resolve
    from torchkiln.data import images

    dataset = ({"type": "CsvImages", "args": {"csv_file": str(root / "labels.csv"), "root": str(root)}} if csv
               else {"type": "ImageFolder", "args": {"root": str(root)}})
    raw = {"name": "b", "seed": 0, "output_dir": "/tmp/unused",
           "data": {"dataset": dataset, "val_split": 0.0, "test_split": 0.0, "batch_size": 64,
                    "num_workers": workers, "transforms": {"train": [{"type": "RandomHorizontalFlip"}], "eval": []}},
           "model": {"type": "SmallCNN", "args": {"num_classes": 4, "in_channels": 3}},
           "trainer": {"epochs": 1, "monitor": "train/loss"}}
    cfg = resolve(raw, "bench")
    kept = images.CODEC_DECODED
    images.CODEC_DECODED = () if pillow else kept  # read by the workers too (fork)
    try:
        t0 = time.perf_counter()
        loaders = build_loaders(cfg, build_data(cfg))
        seen = sum(len(batch[0]) for batch in loaders["train"])
        return time.perf_counter() - t0, seen
    finally:
        images.CODEC_DECODED = kept


VARIANTS = {
    "torchvision": lambda root, w: torchvision_epoch(root, w),
    "torchkiln": lambda root, w: torchkiln_epoch(root, w),
    "torchkiln, Pillow": lambda root, w: torchkiln_epoch(root, w, pillow=True),
    "torchkiln CsvImages": lambda root, w: torchkiln_epoch(root, w, csv=True),
}


def decoder_row(path: Path, repeats: int) -> str:
    from PIL import Image
    from torchcodec.decoders import decode_image
    from torchvision.transforms.v2.functional import pil_to_tensor

    def pillow() -> torch.Tensor:
        with Image.open(path) as im:
            return pil_to_tensor(im.convert("RGB"))

    def codec() -> torch.Tensor:
        return decode_image(path, mode="RGB", output_dtype="auto")

    assert torch.equal(pillow(), codec()), f"{path}: the decoders give different pixels"
    times: dict[str, list[float]] = {"pillow": [], "codec": []}
    for _ in range(3):
        for name, fn in (("pillow", pillow), ("codec", codec)):
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[name].append((time.perf_counter() - t0) / repeats)
    p, c = statistics.median(times["pillow"]), statistics.median(times["codec"])
    return f"| {path.suffix[1:]} | {path.stat().st_size // 1024} KiB | {p * 1e6:.0f} | {c * 1e6:.0f} | {p / c:.2f}x | same |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,224", help="image sides in pixels")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-repeats", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the decoders compared on one thread; put back at the end
    try:
        _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    base = Path(tempfile.mkdtemp(prefix="kiln-images-"))
    decode_rows, rows = [], []
    try:
        folders = {(ext, size): make_folder(base / f"{ext}{size}", ext, size, args.images)
                   for ext in FORMATS for size in sizes}
        for (ext, size), root in folders.items():
            decode_rows.append(decoder_row(next((root / "c0").iterdir()), args.decode_repeats).replace(
                "| " + ext + " |", f"| {ext} {size}px |", 1))
            print(decode_rows[-1], flush=True)
        for (ext, size), root in folders.items():
            for w in workers:
                for run in VARIANTS.values():  # the page cache warm, every import paid once
                    run(root, w)
                rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
                for _ in range(args.repeats):
                    for name, run in VARIANTS.items():
                        seconds, seen = run(root, w)
                        assert seen == args.images, (name, seen)
                        rates[name].append(seen / seconds)
                med = {name: statistics.median(r) for name, r in rates.items()}
                tv = med["torchvision"]
                rows.append(f"| {ext} | {size} | {w} | {tv:.0f} | " + " | ".join(
                    f"{med[name]:.0f} ({med[name] / tv:.2f}x)" for name in list(VARIANTS)[1:]) + " |")
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    command = (f"python benchmarks/image_loading.py --sizes {args.sizes} --images {args.images}"
               f" --workers {args.workers} --repeats {args.repeats}")
    lines = [f"# Image loading: images/s through the training loader\n\n{datetime.date.today()}, {machine()}."
             f" `{command}`\n",
             "Decoding one image on one thread, microseconds (median of 3 rounds):\n",
             "| format | file | Pillow | TorchCodec | Pillow / TorchCodec | pixels |",
             "|---|---:|---:|---:|---:|---|", *decode_rows, "",
             f"One epoch over {args.images} images, batch 64, flip + float32; images/s (ratio to torchvision):\n",
             "| format | px | workers | torchvision ImageFolder | " + " | ".join(list(VARIANTS)[1:]) + " |",
             "|---|---:|---:|---:|" + "---:|" * (len(VARIANTS) - 1), *rows]
    if args.out:
        write_results(lines, args.out)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
