"""Generated stand-in for the mask / gender / age competition data, in its shape: face images and
train.csv (image, mask, gender, age: 3 / 2 / 3 classes, imbalanced as in the competition), and the
unlabelled eval images with info.csv (ImageID, ans) that a submission fills in.

    python make_data.py --out data --train 720 --eval 120

The labels show in the pixels (each head in one colour channel), so a small CNN learns them in a
few epochs on a CPU.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

HEADS = ("mask", "gender", "age")
SHARES = {"mask": [0.7, 0.15, 0.15], "gender": [0.6, 0.4], "age": [0.5, 0.35, 0.15]}


def face(mask: int, gender: int, age: int, rng: np.random.Generator, size: int = 24) -> Image.Image:
    pixels = rng.normal(50, 25, (size, size, 3))
    pixels[size - (mask + 1) * size // 4:, :, 0] += 140  # the mask: a band over the lower face
    pixels[size // 2:, :, 1] += 70 + 90 * gender
    pixels[: size // 2, :, 2] += 55 * (age + 1)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.choice(len(SHARES[h]), n, p=SHARES[h]) for h in HEADS], axis=1)


def make(out: Path, train: int = 720, evaluate: int = 120, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (out / "train" / "images").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "train" / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *HEADS])
        for i, row in enumerate(labels(train, rng)):
            name = f"images/{i:05d}.png"
            face(*row, rng).save(out / "train" / name)
            writer.writerow([name, *row])
    with open(out / "eval" / "info.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageID", "ans"])
        for i, row in enumerate(labels(evaluate, rng)):
            name = f"images/{i:05d}.png"
            face(*row, rng).save(out / "eval" / name)
            writer.writerow([name, ""])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data")
    p.add_argument("--train", type=int, default=720)
    p.add_argument("--eval", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make(Path(a.out), a.train, a.eval, a.seed)
    print(f"wrote {a.out}/train/train.csv ({a.train} images) and {a.out}/eval/info.csv ({a.eval} images)")
