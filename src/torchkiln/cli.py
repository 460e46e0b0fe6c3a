"""`kiln`: a thin layer over the config and the Trainer. Heavy packages are imported lazily."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from torchkiln import __version__
from torchkiln.errors import KilnError

log = logging.getLogger("torchkiln")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kiln",
        description="torchkiln: config-driven PyTorch training. Without -c, the packaged default config"
        " (digits, a small CNN) is used.",
    )
    p.add_argument("--version", action="version", version=f"torchkiln {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train from a config (overrides: key.path=value)")
    t.add_argument("-c", "--config", help="YAML or JSON config file (default: the packaged one)")
    t.add_argument("--resume", metavar="auto|RUN_DIR|CKPT", help="continue a run from its checkpoint")
    t.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    t.add_argument("overrides", nargs="*", metavar="key.path=value")

    e = sub.add_parser("test", help="evaluate a run's best checkpoint on its test split")
    e.add_argument("run_dir", help="a run directory (runs/<name>/<timestamp>)")
    e.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("-q", "--quiet", action="store_true")
    e.add_argument("overrides", nargs="*", metavar="key.path=value")

    x = sub.add_parser("export", help="write a run's best weights as safetensors, with the model config")
    x.add_argument("run_dir", help="a run directory (runs/<name>/<timestamp>)")
    x.add_argument("--format", default="safetensors", choices=["safetensors", "pt"])
    x.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    x.add_argument("-o", "--out", help="output folder (default: RUN_DIR/export)")

    c = sub.add_parser("config", help="show the resolved config, or its JSON Schema")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION")
    show = csub.add_parser("show", help="print the resolved config as YAML (and nothing else)")
    show.add_argument("-c", "--config")
    show.add_argument("overrides", nargs="*", metavar="key.path=value")
    csub.add_parser("schema", help="print the config's JSON Schema")
    return p


def _console(quiet: bool) -> None:
    if any(getattr(h, "_kiln_console", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._kiln_console = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _dispatch(args, parser)
    except KilnError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from torchkiln.config.load import load_config

    if args.command == "config":
        if args.config_command == "schema":
            from torchkiln.config.schema import Config

            print(json.dumps(Config.model_json_schema(), indent=2))
            return 0
        if args.config_command == "show":
            from torchkiln.config.load import dump_yaml

            sys.stdout.write(dump_yaml(load_config(args.config, args.overrides)))
            return 0
        parser.parse_args(["config", "--help"])
        return 2

    _console(getattr(args, "quiet", False))
    if args.command == "train":
        from torchkiln import run

        resume = state = None
        cfg = load_config(args.config, args.overrides) if args.resume in (None, "auto") else None
        if args.resume:
            found = run.resume_config(args.resume, cfg, args.overrides)
            if found is None:
                log.info("--resume auto: no checkpoint of '%s' under %s yet; starting a new run",
                         cfg.name, cfg.output_dir)
            else:
                cfg, resume, state = found
                log.info("resuming from %s", resume)
        from torchkiln.engine.state import StopRequested

        try:
            run.train(cfg, resume=resume, progress=not args.quiet, state=state)
        except StopRequested as stop:
            return 128 + stop.signum
        return 0

    if args.command == "test":
        from torchkiln import run

        results = run.test(Path(args.run_dir), checkpoint=args.checkpoint, split=args.split,
                           overrides=args.overrides)
        width = max(len(k) for k in results) if results else 0
        for k, v in results.items():
            print(f"{k:<{width}}  {v:.6f}")
        return 0
    if args.command == "export":
        from torchkiln.export import export

        for path in export(Path(args.run_dir), args.format, args.checkpoint, args.out):
            print(path)
        return 0
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
