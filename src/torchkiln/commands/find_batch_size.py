"""`kiln find-batch-size -c cfg.yaml [overrides]`: the largest per-process batch whose training
step fits, found with real steps of the configured run (engine/batch_finder.py); the answer is
the last line printed. `data.batch_size: auto` runs the same search at the start of `kiln train`."""

from __future__ import annotations

import argparse

from torchkiln.commands.logs import console


def main(args: argparse.Namespace) -> int:
    from torchkiln.commands.train import find_batch_size
    from torchkiln.config.load import config_errors_from, default_config_path, load_checked
    from torchkiln.engine import distributed
    from torchkiln.engine.batch_finder import check_search
    from torchkiln.errors import flag_errors

    with flag_errors({"mode": "--mode", "margin": "--margin"}):
        check_search(args.mode, args.margin)
    console(args.quiet)
    cfg = load_checked(args.config, args.overrides)
    distributed.init_from_env(cfg.trainer.device, cfg.trainer.dist_timeout)  # under torchrun: every rank
    rank0 = distributed.is_rank0()
    try:
        with config_errors_from(str(args.config or default_config_path())):
            result = find_batch_size(cfg, mode=args.mode, max_size=args.max, margin=args.margin, start=args.start)
    finally:
        distributed.destroy()
    if rank0:
        for line in result.lines():
            print(line)
        print(result.size)
    return 0
