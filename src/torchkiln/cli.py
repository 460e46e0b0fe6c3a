"""`kiln`: parses the command line and hands it to the subcommand's module in `commands/`.
Nothing heavy is imported here (`kiln --help` stays fast): each command module is imported when it runs."""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading

from torchkiln import gcpause
from torchkiln.errors import ConfigError, KilnError, report
from torchkiln.version import __version__

# subcommand -> the module (in torchkiln.commands) whose main(args) runs it
COMMANDS = {
    "train": "train",
    "test": "test",
    "predict": "predict",
    "report": "report",
    "summary": "summary",
    "export": "export",
    "config": "config",
    "data": "data",
    "new": "new",
    "list": "list",
    "lr-find": "lr_find",
    "tune": "tune",
    "find-batch-size": "find_batch_size",
    "doctor": "doctor",
}
# subcommands made of actions: the attribute that holds the action (none given: the help, exit 2)
ACTIONS = {"config": "config_command", "data": "data_command"}


class Bounded(argparse.Action):
    """A number flag with a range (`least` <= N, `above` < N, N <= `most`): a number outside it is a
    user error while the command line is parsed, one line naming the flag, before anything runs."""

    def __init__(self, option_strings, dest, least=None, above=None, most=None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.bounds = [(op, b) for op, b in ((">=", least), (">", above), ("<=", most)) if b is not None]

    def __call__(self, parser, namespace, value, option_string=None):
        if not all(value >= b if op == ">=" else value > b if op == ">" else value <= b for op, b in self.bounds):
            wanted = " and ".join(f"{op} {b}" for op, b in self.bounds)
            raise ConfigError(f"{option_string}: expected a number {wanted}; found {value}")
        setattr(namespace, self.dest, value)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kiln",
        description="torchkiln: config-driven PyTorch training. Without -c, the packaged default config"
        " (digits, a small CNN) is used.",
    )
    p.add_argument("--version", action="version", version=f"torchkiln {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    adders = (
        _add_train,
        _add_test,
        _add_predict,
        _add_report,
        _add_summary,
        _add_export,
        _add_config,
        _add_data,
        _add_new,
        _add_list,
        _add_lr_find,
        _add_tune,
        _add_memory,
    )
    for add in adders:
        add(sub)
    return p


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train from a config (overrides: key.path=value)")
    t.add_argument("-c", "--config", help="YAML or JSON config file (default: the packaged one)")
    t.add_argument("--resume", metavar="auto|RUN_DIR|CKPT", help="continue a run from its checkpoint")
    t.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    t.add_argument("--folds", action="store_true",
                   help="k-fold cross-validation: train every fold of data.folds, report mean and spread")
    t.add_argument("--devices", type=int, default=1, metavar="N", action=Bounded, least=1,
                   help="start N processes on this machine (DDP, one per GPU; Gloo on CPU)")
    t.add_argument("--max-restarts", type=int, default=0, metavar="K", action=Bounded, least=0,
                   help="with --devices: restart the workers up to K times, resuming from the last checkpoint")
    t.add_argument("--fast-dev-run", type=int, nargs="?", const=2, metavar="N", action=Bounded, least=1,
                   help="N batches (default 2) of train, val and test through everything (callbacks, loggers,"
                   " a checkpoint and a resume) in a temporary run directory; one line per check")
    t.add_argument("--overfit-batches", type=int, metavar="N", action=Bounded, least=1,
                   help="train on the same N batches (no shuffle, augmentation or scheduler), validated on"
                   " themselves, 50 epochs unless trainer.epochs=K; ends with a pass/fail verdict line")
    t.add_argument("--overfit-threshold", type=float, default=0.1, metavar="F", action=Bounded, above=0, most=1,
                   help="--overfit-batches passes when the loss falls to this share of its start (default 0.1)")
    t.add_argument("--memory-snapshot", type=int, metavar="N", action=Bounded, least=1,
                   help="record the first N steps' CUDA memory history into the run's memory_snapshot.pickle")
    t.add_argument("overrides", nargs="*", metavar="key.path=value")


def _add_test(sub) -> None:
    e = sub.add_parser("test", help="evaluate a run's best checkpoint on its test split")
    e.add_argument("run_dir", help="a run directory (runs/<name>/<timestamp>)")
    e.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("--tta", default="none", choices=["none", "flip", "flip+crops"],
                   help="test-time augmentation: average the probabilities over flipped (and cropped) views")
    e.add_argument("-q", "--quiet", action="store_true")
    e.add_argument("overrides", nargs="*", metavar="key.path=value")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict with a run's (or an export's) model; writes a CSV (a submission)")
    p.add_argument("run_dir", help="a run directory, or an export folder (model.json)")
    p.add_argument("--input", required=True, metavar="PATH",
                   help="a folder of images (recursively), a CSV of image paths, or split:test / split:val")
    p.add_argument("--out", help="the CSV to write (default: RUN_DIR/predictions/predictions.csv)")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    p.add_argument("--id-col", default="id", help="the id column's name (kept from a CSV that has it)")
    p.add_argument("--pred-col", default="pred", help="the predicted class's column name")
    p.add_argument("--image-col", help="a CSV's image column (default: the run's data.dataset.args.image_col)")
    p.add_argument("--root", help="the folder a CSV's image paths are relative to (default: the CSV's)")
    p.add_argument("--probs", action="store_true", help="a probability column per class")
    p.add_argument("--topk", type=int, metavar="K", action=Bounded, least=1, help="the K most probable classes and their probabilities")
    p.add_argument("--tta", default="none", choices=["none", "flip", "flip+crops"], help="test-time augmentation")
    p.add_argument("--coco-ann", metavar="ANN.json", help="detection: the COCO file whose image and category ids"
                   " the results JSON (<out stem>.coco.json) uses (default: input positions and labels)")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="an unreadable image: stop (raise), or write an empty prediction and list it (skip)")
    p.add_argument("--batch-size", type=int, default=64, action=Bounded, least=1)
    p.add_argument("--num-workers", type=int, default=0, action=Bounded, least=0)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("-q", "--quiet", action="store_true")


def _add_report(sub) -> None:
    r = sub.add_parser("report", help="compare runs: differing config keys, best/final metrics, overlaid curves")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (or runs/<name> folders)")
    r.add_argument("-o", "--out", default="kiln-report", help="folder for curves.png and index.html")


def _add_summary(sub) -> None:
    m = sub.add_parser("summary", help="the model's layers, output shapes, parameters, MACs and memory")
    m.add_argument("-c", "--config", help="YAML or JSON config file (default: the packaged one)")
    m.add_argument("--batch-size", type=int, action=Bounded, least=1, help="batch size to size for (default: data.batch_size)")
    m.add_argument("--depth", type=int, default=3, action=Bounded, least=0, help="nesting depth of the layer table (default: 3)")
    m.add_argument("overrides", nargs="*", metavar="key.path=value")


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="write a run's best weights (safetensors, ONNX, torch.export) and model.json")
    x.add_argument("run_dir", help="a run directory (runs/<name>/<timestamp>)")
    x.add_argument("--format", default="safetensors", choices=["safetensors", "pt", "onnx", "pt2"])
    x.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    x.add_argument("-o", "--out", help="output folder (default: RUN_DIR/export)")


def _add_config(sub) -> None:
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


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="inspect the configured data")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    st = dsub.add_parser("stats", help="class counts, imbalance, image sizes, mean/std; saves a class histogram")
    st.add_argument("-c", "--config")
    st.add_argument("-o", "--out", help="folder for stats.json and class_histogram.png"
                    " (default: <output_dir>/<name>/data_stats)")
    st.add_argument("--max-images", type=int, default=2000, action=Bounded, least=1, help="images decoded for sizes and mean/std")
    st.add_argument("overrides", nargs="*", metavar="key.path=value")
    ck = dsub.add_parser("check", help="audit COCO-format (or CSV) box annotations: count and list every fault;"
                         " --fix writes a corrected copy")
    ck.add_argument("annotations", metavar="ANN", help="COCO JSON, or a CSV of image,x1,y1,x2,y2,label")
    ck.add_argument("--images", required=True, metavar="DIR", help="the image folder")
    ck.add_argument("--fix", metavar="OUT", help="write the corrected annotations here (the input is kept)")
    ck.add_argument("--inverted", choices=["fix", "drop"], default="fix",
                    help="inverted corners: put them in order (default) or drop the box")
    ck.add_argument("--min-size", type=float, default=1.0, action=Bounded, least=0, help="boxes with a side below this are dropped")
    ck.add_argument("--strict", action="store_true", help="exit 1 when any fault was found")
    ck.add_argument("--report", default="report.json", help="where report.json goes (default: ./report.json)")
    sh = dsub.add_parser("shapes", help="write the generated detection demo (COCO JSON + images, injected faults)")
    sh.add_argument("out", help="folder for annotations.json, faults.json and images/")
    sh.add_argument("--images", type=int, default=300, action=Bounded, least=2)
    sh.add_argument("--size", type=int, default=128, action=Bounded, least=16, help="image side in px")
    sh.add_argument("--seed", type=int, default=0)


def _add_new(sub) -> None:
    n = sub.add_parser("new", help="make a project of your own: a package with its data, model, config"
                       " and tests, registered with torchkiln by entry points")
    n.add_argument("name", help="the project's name (a Python package name: letters, digits, _)")
    n.add_argument("--template", default="classification", choices=["classification", "multihead", "detection"],
                   help="classification: one label; multihead: several heads (mask, gender, age);"
                   " detection: boxes (a small Faster R-CNN)")
    n.add_argument("--dir", help="where to make the project folder (default: ./NAME)")


def _add_list(sub) -> None:
    ls = sub.add_parser("list", help="every registered component: name, where it comes from, signature")
    ls.add_argument("kind", nargs="?", metavar="KIND",
                    help="models, datasets, losses, optimizers, schedulers, metrics, callbacks or tasks")
    ls.add_argument("--filter", metavar="TEXT", help="only names containing TEXT (or matching a glob: 'resnet*')")


def _add_lr_find(sub) -> None:
    f = sub.add_parser("lr-find", help="LR range test on the run's own parts: lr_find.png and a suggested LR"
                       " (the last line printed)")
    f.add_argument("-c", "--config", help="YAML or JSON config file (default: the packaged one)")
    f.add_argument("-o", "--out", help="folder for lr_find.png and lr_find.json (default: <output_dir>/<name>/lr_find)")
    f.add_argument("--apply", metavar="OUT.yaml", help="write the config with the suggested LR set"
                   " (optimizer.args.lr, and OneCycleLR's max_lr)")
    f.add_argument("--start", type=float, default=1e-7, help="first LR (default 1e-7)")
    f.add_argument("--end", type=float, default=10.0, help="last LR (default 10)")
    f.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    f.add_argument("overrides", nargs="*", metavar="key.path=value")


def _add_tune(sub) -> None:
    u = sub.add_parser("tune", help="hyperparameter search over config keys (tune: section) with Ray Tune")
    u.add_argument("-c", "--config", help="YAML or JSON config file with a tune: section")
    u.add_argument("--address", metavar="auto|ray://HOST:10001",
                   help="join this Ray cluster (default: start a local Ray with this machine's CPUs and GPUs)")
    u.add_argument("--resume", metavar="SEARCH_DIR", help="continue an interrupted search (its tune-<timestamp> folder)")
    u.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    u.add_argument("overrides", nargs="*", metavar="key.path=value")


def _add_memory(sub) -> None:
    f = sub.add_parser("find-batch-size", help="the largest batch whose training step fits the device's memory")
    f.add_argument("-c", "--config", help="YAML or JSON config file (default: the packaged one)")
    f.add_argument("--mode", default="binsearch", choices=["power", "binsearch"],
                   help="power: double until out of memory; binsearch: then bisect (default)")
    f.add_argument("--max", type=int, default=4096, action=Bounded, least=1, help="the largest size tried (default: 4096)")
    f.add_argument("--start", type=int, default=2, action=Bounded, least=1, help="the first size tried (default: 2)")
    f.add_argument("--margin", type=float, default=0.1, help="fraction kept off the answer (default: 0.1)")
    f.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    f.add_argument("overrides", nargs="*", metavar="key.path=value")
    d = sub.add_parser("doctor", help="versions, GPUs, precisions and extras; warns about what will not work"
                       " well (exit code 1 when something is wrong)")
    d.add_argument("-c", "--config", help="also check this config's precision against the machine")
    d.add_argument("overrides", nargs="*", metavar="key.path=value")


def run() -> None:
    """The `kiln` process: `main`, then the exit Python would make, less its last part.

    Python's exit waits for the threads it waits for, runs the atexit handlers, flushes, and then
    frees every module and object one by one: with torch loaded that last part takes about 2 s
    (benchmarks/startup.py) and changes nothing outside the process. So the first three are done
    here, in Python's order, and the process ends with the exit code. Where the interpreter lacks
    the hooks for them, the process ends the ordinary way.
    """
    gcpause.pause()  # until the training loop starts (gcpause.py); the other commands resume it in main
    code = int(main() or 0)
    shutdown, exitfuncs = getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or exitfuncs is None:
        raise SystemExit(code)
    shutdown()  # joins the non-daemon threads (and closes thread pools) as Python's exit does first
    exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say on it
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except KilnError as exc:  # a number flag out of its range (Bounded): nothing has run yet
        report(exc)
        return exc.exit_code
    if args.command != "train" or getattr(args, "folds", None):  # --folds: each fold's parts are freed
        gcpause.resume()
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
        report(exc)
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
    """Run the subcommand's `main(args)`; a subcommand of actions given none prints its help."""
    action = ACTIONS.get(args.command)
    if action is not None and getattr(args, action) is None:
        parser.parse_args([args.command, "--help"])
        return 2
    name = COMMANDS[args.command]
    if args.command == "train":  # train --folds; --fast-dev-run and --overfit-batches (commands/devrun.py)
        devrun = args.fast_dev_run is not None or args.overfit_batches is not None
        name = "devrun" if devrun else "kfold" if args.folds else name
    return importlib.import_module(f"torchkiln.commands.{name}").main(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
