"""`kiln predict RUN_DIR --input PATH`: a run's (or an export's) model over a folder of images, a CSV
of image paths or the run's own split, written as a CSV in input order (a submission file with
`--id-col` / `--pred-col`). A detection run writes one row per box and the COCO results JSON
beside the CSV (`<out stem>.coco.json`; image and category ids from `--coco-ann`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from torchkiln.commands.logs import console


def main(args: argparse.Namespace) -> int:
    """Print the paths written."""
    console(args.quiet)
    from torchkiln.inference import load

    predictor = load(Path(args.run_dir), checkpoint=args.checkpoint, device=args.device)
    result = predictor.predict(
        args.input, args.out, id_col=args.id_col, pred_col=args.pred_col, probs=args.probs, topk=args.topk,
        tta=args.tta, on_error=args.on_error, batch_size=args.batch_size, num_workers=args.num_workers,
        image_col=args.image_col, root=args.root, progress=not args.quiet, coco_ann=args.coco_ann,
    )
    for path in result.files:
        print(path)
    return 0
