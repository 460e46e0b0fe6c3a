"""`kiln export`: a run's weights plus `model.json`, and with `--format onnx|pt2` the model compiled
for other runtimes, each checked against the eager model on real validation inputs.

- `model.json` (inference/card.py) holds all that rebuilds and feeds the model: its type and
  arguments with `num_classes`, the task and heads, the class names, the eval preprocessing, the
  input shape and channels, and the torchkiln and torch versions. `torchkiln.load(EXPORT_DIR)`
  works from it and the weights alone.
- The weights are `model.safetensors` (`--format pt`: a plain state_dict `model.pt`); they need
  neither torchkiln nor pickle to read.
- `onnx`: `model.onnx` from `torch.onnx.export(dynamo=True, external_data=False)` with a dynamic
  batch axis, checked with `onnx.checker`, run with onnxruntime. `pt2`: `model.pt2`, a
  `torch.export` ExportedProgram. Both are compared with the eager model at batch 1, 3 and 7; above
  atol 1e-4 / rtol 1e-3 the export fails (exit 2) and says by how much.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from torchkiln.commands.logs import console
from torchkiln.errors import CheckpointError, ConfigError, KilnError
from torchkiln.inference.card import CARD, card_from_config, input_info, require_model_type
from torchkiln.rundir import CHECKPOINTS, EXPORT, LAST, checkpoint_path

log = logging.getLogger("torchkiln")
FORMATS = ("safetensors", "pt", "onnx", "pt2")
PARITY_BATCHES = (1, 3, 7)
ATOL, RTOL = 1e-4, 1e-3
EXTRA_HINT = "needs the 'export' extra: pip install 'torchkiln[export]' (onnx, onnxscript, onnxruntime)"


class ExportError(KilnError):
    """The exported program does not match the eager model (or could not be made)."""


def main(args: argparse.Namespace) -> int:
    """Print the paths of the files written."""
    console(quiet=False)
    for path in export(Path(args.run_dir), args.format, args.checkpoint, args.out):
        print(path)
    return 0


def export(run_dir: str | Path, fmt: str = "safetensors", checkpoint: str = "best",
           out_dir: str | Path | None = None) -> list[Path]:
    """Write the weights and model.json (and model.onnx / model.pt2) into `out_dir` (default RUN_DIR/export)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}; found {fmt!r}")
    if fmt == "onnx":
        require_onnx()
    run_dir = Path(run_dir)
    ckpt, state = _checkpoint(run_dir, checkpoint)
    import torch

    from torchkiln.engine.checkpoint import model_weights, strip_prefixes
    from torchkiln.inference.predictor import build_model

    weights = {k: v.detach().cpu().contiguous() for k, v in strip_prefixes(model_weights(state, ckpt)).items()}
    card = _card(state, ckpt, fmt, weights)
    out = Path(out_dir) if out_dir is not None else run_dir / EXPORT
    out.mkdir(parents=True, exist_ok=True)
    written = [_write_weights(out, fmt, weights, card)]
    if fmt in ("onnx", "pt2"):
        model = build_model(card, weights)
        inputs = parity_inputs(run_dir, state)
        card["input"] = input_info(inputs)
        with torch.no_grad():
            path = out / f"model.{fmt}"
            _atomic(path, lambda p: (onnx_export if fmt == "onnx" else pt2_export)(model, inputs[:3], p))
            card["parity"] = check_parity(model, inputs, runner(fmt, path), fmt)
        written.append(path)
    else:
        card["input"] = card.get("input") or _input_from_data(run_dir, state)  # the run recorded it, or one sample
    config_path = out / CARD
    _atomic(config_path, lambda p: p.write_text(json.dumps(card, indent=2) + "\n"))
    return [*written[:1], config_path, *written[1:]]


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--format onnx {EXTRA_HINT} ({exc.name} is missing)") from None


def _checkpoint(run_dir: Path, checkpoint: str) -> tuple[Path, dict[str, Any]]:
    from torchkiln.engine.checkpoint import FORMAT, load_checkpoint

    ckpt = checkpoint_path(run_dir, checkpoint)
    if checkpoint == "best" and not ckpt.is_file() and (run_dir / CHECKPOINTS / LAST).is_file():
        raise CheckpointError(f"{ckpt}: not found (no epoch finished with a monitored value yet);"
                              " use --checkpoint last")
    if not ckpt.is_file() and not (run_dir / CHECKPOINTS).is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (no {CHECKPOINTS}/ folder)")
    state = load_checkpoint(ckpt)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}: not a torchkiln checkpoint")
    return ckpt, state


def _card(state: dict[str, Any], ckpt: Path, fmt: str, weights: dict[str, Any]) -> dict[str, Any]:
    import torch

    from torchkiln.engine.checkpoint import weights_kind
    from torchkiln.version import __version__

    config: dict[str, Any] = state.get("config") or {}
    require_model_type(config, ckpt)  # before any file is written
    loop = state.get("loop") or {}
    return {
        **card_from_config(config),
        "source_checkpoint": str(ckpt),
        "weights": weights_kind(state),  # ema / swa: the averaged weights the run validated; model: as trained
        "epoch": loop.get("epoch"),
        "global_step": loop.get("global_step"),
        "monitor": (config.get("trainer") or {}).get("monitor"),
        "best": loop.get("best"),
        "torchkiln": __version__,
        "torch": str(torch.__version__),
        "format": fmt,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in weights.items()},
    }


def _write_weights(out: Path, fmt: str, weights: dict[str, Any], card: dict[str, Any]) -> Path:
    if fmt == "pt":
        import torch

        path = out / "model.pt"
        _atomic(path, lambda p: torch.save(weights, p))
        return path
    from safetensors.torch import save_file

    path = out / "model.safetensors"
    meta = {"format": "pt", "torchkiln": card["torchkiln"], "model_type": str(card["model"]["type"])}
    _atomic(path, lambda p: save_file(_unshare(weights), str(p), metadata=meta))
    return path


# -- real inputs ----------------------------------------------------------------------------------
def parity_inputs(run_dir: Path, state: dict[str, Any], n: int = max(PARITY_BATCHES)) -> Any:
    """The first `n` inputs of the run's validation split (else test, else train), as one batch."""
    import torch

    from torchkiln.inference.run_data import run_data

    data = run_data(run_dir, state)
    dataset = data.val if data.val is not None else data.test if data.test is not None else data.train
    xs = [_input_of(dataset[i % len(dataset)]) for i in range(n)]
    return torch.stack(xs).float()


def _input_of(sample: Any) -> Any:
    import torch

    x = sample["input"] if isinstance(sample, dict) else sample[0] if isinstance(sample, (tuple, list)) else sample
    return torch.as_tensor(x).as_subclass(torch.Tensor)


def _input_from_data(run_dir: Path, state: dict[str, Any]) -> dict[str, Any] | None:
    """The input shape of one real sample; None when the run's data cannot be read here."""
    try:
        return input_info(parity_inputs(run_dir, state, n=1))
    except (KilnError, OSError) as exc:
        log.warning("model.json: input shape left out (the run's data could not be read: %s)", exc)
        return None


# -- the formats ----------------------------------------------------------------------------------
def _dynamic_batch() -> Any:
    from torch.export import Dim

    return ({0: Dim("batch", min=1, max=65536)},)


def onnx_export(model: Any, example: Any, path: Path) -> None:
    import onnx
    import torch

    try:
        program = torch.onnx.export(model, (example,), dynamo=True, external_data=False,
                                    dynamic_shapes=_dynamic_batch(), input_names=["input"], verbose=False)
        program.save(str(path), external_data=False)
    except Exception as exc:  # noqa: BLE001 - the exporter's many failure kinds: one line
        raise ExportError(f"torch.onnx.export could not export this model: {str(exc).splitlines()[0]}") from exc
    onnx.checker.check_model(str(path), full_check=True)


def pt2_export(model: Any, example: Any, path: Path) -> None:
    import torch

    try:
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"torch.export could not export this model: {str(exc).splitlines()[0]}") from exc
    torch.export.save(program, str(path))


def runner(fmt: str, path: Path) -> Any:
    """A function batch -> list of output arrays, running the exported file as its runtime would."""
    import torch

    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]
    module = torch.export.load(str(path)).module()
    return lambda x: _leaves(module(x))


def _leaves(outputs: Any) -> list[Any]:
    if isinstance(outputs, dict):
        return [t for v in outputs.values() for t in _leaves(v)]
    if isinstance(outputs, (list, tuple)):
        return [t for v in outputs for t in _leaves(v)]
    return [outputs]


def check_parity(model: Any, inputs: Any, run: Any, fmt: str) -> dict[str, Any]:
    """Max abs / rel difference to the eager model per batch size; fails above atol/rtol."""
    import torch

    report: dict[str, Any] = {"atol": ATOL, "rtol": RTOL, "batches": {}}
    for b in PARITY_BATCHES:
        x = inputs[:b]
        with torch.no_grad():
            want = [t.float() for t in _leaves(model(x))]
        got = [torch.as_tensor(t).float() for t in run(x)]
        if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
            raise ExportError(f"{fmt} parity at batch {b}: output shapes {[tuple(g.shape) for g in got]},"
                              f" eager {[tuple(w.shape) for w in want]}")
        abs_diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
        rel_diff = max(float(((g - w).abs() / w.abs().clamp_min(1e-12)).max()) for g, w in zip(got, want))
        close = all(torch.allclose(g, w, atol=ATOL, rtol=RTOL) for g, w in zip(got, want))
        report["batches"][str(b)] = {"max_abs": abs_diff, "max_rel": rel_diff}
        log.info("%s parity at batch %d: max abs diff %.3g, max rel diff %.3g", fmt, b, abs_diff, rel_diff)
        if not close:
            raise ExportError(f"{fmt} parity at batch {b}: max abs diff {abs_diff:.3g}, max rel diff {rel_diff:.3g},"
                              f" above atol {ATOL:g} / rtol {RTOL:g} against the eager model")
    return report


def _unshare(weights: dict[str, Any]) -> dict[str, Any]:
    """safetensors refuses tensors that share memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _atomic(path: Path, write) -> None:
    import os

    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # the suffix kept: torch.export.save wants .pt2
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: could not write ({exc.strerror or exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
