"""`kiln data stats`: class counts, imbalance, image sizes and mean/std of the configured training
split; stats.json and the class histogram are saved."""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    return {"stats": stats}[args.data_command](args)


def stats(args: argparse.Namespace) -> int:
    from torchkiln.commands.logs import console
    from torchkiln.config.build import data_stats
    from torchkiln.config.load import load_config
    from torchkiln.data.stats import format_stats

    console(False)
    found, out_dir = data_stats(load_config(args.config, args.overrides), args.out, args.max_images)
    print(format_stats(found))
    if (out_dir / "class_histogram.png").is_file():
        print(f"class histogram    {out_dir / 'class_histogram.png'}")
    return 0
