"""`kiln data stats`: class counts, imbalance, image sizes and mean/std of the configured training
split (boxes per image, box sizes and class counts for detection); stats.json and the class
histogram are saved. `kiln data check`: the detection annotation audit. `kiln data shapes`: the
generated detection demo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(args: argparse.Namespace) -> int:
    return {"stats": stats, "check": check, "shapes": shapes}[args.data_command](args)


def stats(args: argparse.Namespace) -> int:
    from torchkiln.commands.logs import console
    from torchkiln.config.build import data_stats
    from torchkiln.config.load import load_config
    from torchkiln.data.stats import format_stats

    console(False)
    found, out_dir = data_stats(load_config(args.config, args.overrides), args.out, args.max_images)
    print(format_stats(found))
    if "boxes_per_image" in found:
        from torchkiln.data.detection.stats import format_detection_stats

        print("\n".join(format_detection_stats(found)))
    if (out_dir / "class_histogram.png").is_file():
        print(f"class histogram    {out_dir / 'class_histogram.png'}")
    return 0


def check(args: argparse.Namespace) -> int:
    """The audit's table and report.json; --fix writes a corrected copy. Exit 1 with --strict
    when faults were found."""
    from torchkiln.data.detection.audit import Policy, audit, read_annotations, write_annotations
    from torchkiln.errors import ConfigError

    source = Path(args.annotations)
    if args.fix and Path(args.fix).resolve() == source.resolve():
        raise ConfigError(f"--fix {args.fix}: that is the input; give another file (the input is never changed)")
    report, fixed = audit(read_annotations(source), args.images,
                          Policy(inverted=args.inverted, clip=True, min_size=args.min_size), where="--images")
    print(f"{source}:")
    print(report.table())
    out = {"annotations": str(source), "images_dir": args.images, **report.to_dict()}
    if args.fix:
        write_annotations(fixed, args.fix)
        out["fixed_file"] = str(args.fix)
        print(f"corrected annotations  {args.fix}")
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(out, indent=2, default=str))
    print(f"report                 {args.report}")
    return 1 if args.strict and report.faults else 0


def shapes(args: argparse.Namespace) -> int:
    from torchkiln.data.detection.shapes import make_shapes

    injected = make_shapes(args.out, images=args.images, size=args.size, seed=args.seed)
    print(f"{args.out}: {args.images} images ({args.size} px), annotations.json; injected faults:"
          f" {', '.join(f'{k} {v}' for k, v in injected.items())}")
    return 0
