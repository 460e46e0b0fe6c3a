"""`kiln`: a thin layer over the config and the Trainer. Heavy packages are imported lazily."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from torchkiln.errors import ConfigError, KilnError
from torchkiln.version import __version__

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
    t.add_argument("--folds", action="store_true",
                   help="k-fold cross-validation: train every fold of data.folds, report mean and spread")
    t.add_argument("--devices", type=int, default=1, metavar="N",
                   help="start N processes on this machine (DDP, one per GPU; Gloo on CPU)")
    t.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="with --devices: restart the workers up to K times, resuming from the last checkpoint")
    t.add_argument("overrides", nargs="*", metavar="key.path=value")

    e = sub.add_parser("test", help="evaluate a run's best checkpoint on its test split")
    e.add_argument("run_dir", help="a run directory (runs/<name>/<timestamp>)")
    e.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("-q", "--quiet", action="store_true")
    e.add_argument("overrides", nargs="*", metavar="key.path=value")

    r = sub.add_parser("report", help="compare runs: differing config keys, best/final metrics, overlaid curves")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (or runs/<name> folders)")
    r.add_argument("-o", "--out", default="kiln-report", help="folder for curves.png and index.html")

    m = sub.add_parser("summary", help="the model's layers, output shapes, parameters, MACs and memory")
    m.add_argument("-c", "--config", help="YAML or JSON config file (default: the packaged one)")
    m.add_argument("--batch-size", type=int, help="batch size to size for (default: data.batch_size)")
    m.add_argument("--depth", type=int, default=3, help="nesting depth of the layer table (default: 3)")
    m.add_argument("overrides", nargs="*", metavar="key.path=value")

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
    chk = csub.add_parser("check", help="build everything a run needs (data, model, loss, optimizer,"
                          " schedule, metrics) and say what it is; writes nothing")
    chk.add_argument("-c", "--config")
    chk.add_argument("overrides", nargs="*", metavar="key.path=value")

    d = sub.add_parser("data", help="inspect the configured data")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    st = dsub.add_parser("stats", help="class counts, imbalance, image sizes, mean/std; saves a class histogram")
    st.add_argument("-c", "--config")
    st.add_argument("-o", "--out", help="folder for stats.json and class_histogram.png"
                    " (default: <output_dir>/<name>/data_stats)")
    st.add_argument("--max-images", type=int, default=2000, help="images decoded for sizes and mean/std")
    st.add_argument("overrides", nargs="*", metavar="key.path=value")
    return p


class _Console(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (not the one at creation)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _console(quiet: bool) -> None:
    handler = next((h for h in log.handlers if isinstance(h, _Console)), None)
    if handler is None:
        handler = _Console()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _launch(args: argparse.Namespace, cfg, resume, run) -> int:
    """`kiln train --devices N`: validate here once, make the run directory, start N workers."""
    from torchkiln.config.build import check_components
    from torchkiln.engine import distributed
    from torchkiln.errors import ConfigError

    if cfg.trainer.strategy == "dp":
        raise ConfigError("trainer.strategy: dp is one process over several GPUs; with --devices use ddp or auto")
    check_components(cfg)
    import torch

    gpus = torch.cuda.device_count() if cfg.trainer.device != "cpu" else 0
    if 0 < gpus < args.devices:
        raise ConfigError(f"--devices {args.devices}: only {gpus} GPU(s) visible; use --devices {gpus}"
                          f" (one process per GPU) or trainer.device=cpu")
    # Planned here, made by the workers' rank 0 once the run is built (nothing before that).
    run_dir = run.run_dir_of(resume) if resume is not None else run.plan_run_dir(cfg)
    worker = (["--debug"] if args.debug else []) + ["train"]
    worker += ["-c", args.config] if args.config else []
    worker += ["--resume", str(resume)] if resume is not None else []
    worker += ["-q"] if args.quiet else []
    log.info("starting %d processes; run directory %s", args.devices, run_dir)
    return distributed.launch(worker + list(args.overrides), args.devices, args.max_restarts, str(run_dir))


def _restart_target(args: argparse.Namespace, run) -> str | None:
    """After an elastic restart, continue from the run's newest checkpoint (if it wrote one)."""
    from torchkiln.config.load import load_config
    from torchkiln.engine import distributed
    from torchkiln.errors import CheckpointError

    target = os.environ.get(distributed.RUN_DIR_ENV) or "auto"
    try:
        found = run.find_checkpoint(target, load_config(args.config, args.overrides))
    except CheckpointError:
        return args.resume
    if found is None:  # the group died before its first checkpoint: start again
        return args.resume
    log.info("restart %d: resuming from %s", distributed.restart_count(), found[0])
    return str(found[0])


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        code = _dispatch(args, parser)
        sys.stdout.flush()  # here, so that a reader who closed the pipe is handled below
        return code
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
    except BrokenPipeError:  # `kiln test RUN | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail too
        return 0


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from torchkiln.config.load import default_config_path, load_checked, load_config

    if args.command == "config":
        if args.config_command == "schema":
            from torchkiln.config.schema import Config

            print(json.dumps(Config.model_json_schema(), indent=2))
            return 0
        if args.config_command == "show":
            from torchkiln.config.load import dump_yaml

            sys.stdout.write(dump_yaml(load_config(args.config, args.overrides)))
            return 0
        if args.config_command == "check":
            from torchkiln import run

            source = str(args.config or default_config_path())
            _console(quiet=True)
            lines = run.check(load_checked(args.config, args.overrides), source)
            print(f"ok: {source}")
            print("\n".join("  " + line for line in lines))
            return 0
        parser.parse_args(["config", "--help"])
        return 2

    if args.command == "report":
        from torchkiln.report import report

        result = report(args.run_dirs, args.out)
        print(result["text"])
        print(f"\nwrote {result['png']} and {result['html']}")
        return 0

    if args.command == "data":
        if args.data_command != "stats":
            parser.parse_args(["data", "--help"])
            return 2
        from torchkiln.config.build import data_stats
        from torchkiln.data.stats import format_stats

        _console(False)
        stats, out_dir = data_stats(load_config(args.config, args.overrides), args.out, args.max_images)
        print(format_stats(stats))
        if (out_dir / "class_histogram.png").is_file():
            print(f"class histogram    {out_dir / 'class_histogram.png'}")
        return 0

    if args.command == "summary":
        from torchkiln.summary import model_summary

        _console(quiet=True)
        print(model_summary(load_config(args.config, args.overrides), args.batch_size, args.depth))
        return 0

    _console(getattr(args, "quiet", False))
    if args.command == "train" and args.folds:
        if args.resume:
            raise ConfigError("--folds and --resume exclude each other; resume a single fold's run instead")
        from torchkiln.kfold import format_folds, train_folds

        root, result = train_folds(load_config(args.config, args.overrides), progress=not args.quiet)
        print(format_folds(result))
        print(f"folds summary      {root / 'folds.json'}")
        return 0
    if args.command == "train":
        from torchkiln import run
        from torchkiln.engine import distributed

        distributed.quiet_other_ranks()  # a worker of rank > 0 logs warnings and errors only
        resume = state = None
        source = str(args.config or default_config_path())
        if not args.resume and distributed.restart_count() > 0:  # a restarted worker group
            args.resume = _restart_target(args, run)
        if args.resume:
            base = load_config(args.config, args.overrides) if args.resume == "auto" else None
            found = run.resume_config(args.resume, base, args.overrides)
            if found is None:
                log.info("--resume auto: no checkpoint of '%s' under %s yet; starting a new run",
                         base.name, base.output_dir)
            else:
                cfg, resume, state = found
                source = str(run.run_dir_of(resume) / "config.yaml")
                log.info("resuming from %s", resume)
        if resume is None:
            cfg = load_checked(args.config, args.overrides)
        if args.devices > 1 and "LOCAL_RANK" not in os.environ:
            return _launch(args, cfg, resume, run)
        from torchkiln.engine.state import StopRequested

        try:
            run.train(cfg, resume=resume, progress=not args.quiet, state=state, source=source)
        except StopRequested as stop:
            return 128 + stop.signum
        finally:
            distributed.destroy()
        return 0

    if args.command == "test":
        from torchkiln import run

        results = run.test(Path(args.run_dir), checkpoint=args.checkpoint, split=args.split,
                           overrides=args.overrides)
        width = max(len(k) for k in results) if results else 0
        for k, v in results.items():
            print(f"{k:<{width}}  {v:.6f}")
        report = Path(args.run_dir) / f"{args.split}_report.txt"
        if report.is_file():
            print()
            print(report.read_text(), end="")
        return 0
    if args.command == "export":
        from torchkiln.export import export

        for path in export(Path(args.run_dir), args.format, args.checkpoint, args.out):
            print(path)
        return 0
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
