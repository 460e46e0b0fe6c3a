"""Checkpoints that are always whole (temp file, fsync, rename) and load safely (weights_only).

A checkpoint is a plain `torch.save` archive of plain data: `torch.load(f)["model"]` and
`["optimizer"]` are what `model.state_dict()` and `optimizer.state_dict()` gave. It is streamed
straight into its temp file (no copy of the state in memory, nothing gathered on a device); the
archive's writer checksums every record (CRC-32) as its bytes go out, and loading checks each
record against its checksum as its bytes come in, before anything from the file is used.
"""

from __future__ import annotations

import collections
import copy
import errno
import itertools
import math
import os
import pickle
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from torchkiln.errors import CheckpointError

try:  # ISA-L's CRC-32 (the zip's own checksum) runs at ~10 GB/s where zlib's runs at 2-3
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same values
    from zlib import crc32

FORMAT = "torchkiln-checkpoint"
TMP_PREFIX = ".tmp-"
PACKED = "torchkiln-packed-tensors"  # the optimizer entry of checkpoints before 0.x: still read
WRITE_BUFFER = 1 << 20  # small records coalesce into 1 MiB writes; bigger ones go straight out
CHECK_CHUNK = 4 << 20  # records of 8 MiB and more are read in 4 MiB chunks, checksummed alongside
# {"kind": "ema" | "swa", "weights": state_dict, ...}: the averaged weights that validation used and
# inference takes (`model_weights`); absent without EMA/SWA. `state["model"]` stays the training weights.
AVERAGED = "averaged"


def save_checkpoint(state: dict[str, Any], path: str | Path, copy_of: str | Path | None = None) -> Path:
    """Write atomically: the final name never holds a partial file.

    `copy_of`: a checkpoint just written from this same `state`; it is hard-linked under the new
    name (copied where the filesystem has no hard links) instead of serializing `state` again:
    best.ckpt and last.ckpt of one epoch cost one torch.save and one write, not two.
    """
    return CheckpointWriter(background=False).save(state, path, copy_of)


def _write_checkpoint(state: Any, path: Path, copy_of: Path | None) -> None:
    """`state` (or a second name of `copy_of`) under a temp name, synced, then renamed to `path`."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        if copy_of is not None:
            _link_or_copy(copy_of, tmp)
        else:
            _write_file(tmp, state)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _remove(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            reason = f"disk full or file size limit reached: {exc.strerror}"
        else:
            reason = exc.strerror or str(exc)
        raise CheckpointError(
            f"{path}: could not write checkpoint ({reason}); the previous checkpoint is intact"
        ) from exc
    except BaseException:
        _remove(tmp)
        raise


class CheckpointWriter:
    """Writes checkpoints in the order given, from one background thread (or inline).

    In the background, `save` first takes one snapshot of the state (tensors copied to host
    memory, pinned for an accelerator's, with one synchronization), so training may change the
    state the moment `save` returns; the writing (serializing into the file, fsync, rename,
    second names) happens behind, in order. A file is whole once it has its final name, whichever
    thread wrote it. At most one snapshot waits at a time: a `save` of a new state first waits for
    what came before. `wait` returns once everything handed over is on disk, and raises the first
    failure (a CheckpointError naming the file); after a failure nothing further is written.
    Inline, the state is serialized straight from where it lives, one tensor at a time.
    """

    def __init__(self, background: bool = True):
        self.background = background
        self._pool = None
        self._pending: list[Any] = []
        self._failure: BaseException | None = None

    def save(self, state: dict[str, Any], path: str | Path, copy_of: str | Path | None = None) -> Path:
        path = Path(path)
        if copy_of is None:
            self.wait()
            self._submit(_write_checkpoint, snapshot(state) if self.background else state, path, None)
        else:
            self._submit(_write_checkpoint, None, path, Path(copy_of))
        return path

    def run(self, fn, *args) -> None:
        """Run `fn(*args)` after everything handed over so far (e.g. pruning old files)."""
        self._submit(fn, *args)

    def _submit(self, fn, *args) -> None:
        if self._failure is not None:
            self.wait()
        if not self.background:
            fn(*args)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkiln-checkpoint")
        self._pending.append(self._pool.submit(self._guarded, fn, *args))

    def _guarded(self, fn, *args) -> None:
        if self._failure is None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by wait()
                self._failure = exc

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def _write_file(path: Path, state: Any) -> None:
    """Serialize `state` into the new file `path` as the bytes are made, then fsync it."""
    with open(path, "xb", buffering=WRITE_BUFFER) as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


_IMMUTABLE = (bool, int, float, complex, str, bytes)
_FLAT = frozenset({*_IMMUTABLE, type(None)})


def snapshot(obj: Any) -> Any:
    """One copy of `obj` (dicts, lists and tuples of tensors and plain data) that nothing else
    holds: tensors copied to host memory (pinned for an accelerator's, copied without blocking,
    then one synchronization per device), containers rebuilt, immutable scalars shared (a deep
    copy of each of the history's floats cost ~1 us apiece: a checkpoint that grew with the
    epochs), other values deep-copied."""
    devices: set[torch.device] = set()

    def copy_of(o: Any) -> Any:
        if o is None or type(o) in _IMMUTABLE:
            return o
        if isinstance(o, torch.Tensor):
            if o.device.type == "cpu":
                return o.detach().clone()
            host = torch.empty(o.shape, dtype=o.dtype, pin_memory=torch.cuda.is_available()
                               and o.device.type == "cuda")
            host.copy_(o.detach(), non_blocking=host.is_pinned())
            devices.add(o.device)
            return host
        if type(o) is dict:
            if _FLAT.issuperset(map(type, o.values())):  # a history row: one C-level copy, not a call a value
                return dict(o)
            return {k: copy_of(v) for k, v in o.items()}
        if type(o) in (list, tuple):
            if type(o) is list and _flat_rows(o):  # the history: its rows copied in C, no call a row
                return list(map(dict, o))
            return type(o)(copy_of(v) for v in o)
        return copy.deepcopy(o)

    out = copy_of(obj)
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return out


_PLAIN_LEAVES = (*_FLAT, torch.Tensor, torch.dtype, torch.device, torch.Size)  # what weights_only loads


def not_plain(obj: Any, where: str = "") -> str | None:
    """Where `obj` holds something that `torch.load(weights_only=True)` refuses (a numpy array, an
    object), said as 'a <type> at <path>'; None when it is all tensors and plain data."""
    if isinstance(obj, _PLAIN_LEAVES):
        return None
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                return f"a {type(k).__name__} key at {where or 'the top'}"
            found = not_plain(v, f"{where}[{k!r}]")
            if found is not None:
                return found
        return None
    if type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            found = not_plain(v, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    kind = type(obj)
    return f"a {kind.__module__}.{kind.__qualname__} at {where or 'the top'}"


def _flat_rows(rows: list) -> bool:
    """A non-empty list of dicts of plain values (a history), checked by C-level iteration only."""
    return bool(rows) and {dict}.issuperset(map(type, rows)) and _FLAT.issuperset(
        map(type, itertools.chain.from_iterable(map(dict.values, rows))))


def _link_or_copy(source: Path, path: Path) -> None:
    """`path` as a second name of `source` (whose data is already on disk), else a synced copy."""
    try:
        os.link(source, path)
    except OSError:
        shutil.copyfile(source, path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale_temps(directory: str | Path) -> list[Path]:
    """Remove temp files left by a process that died while writing."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for p in directory.glob(f"{TMP_PREFIX}*"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def decode(state: Any) -> Any:
    """A checkpoint as `save_checkpoint` writes it today. Checkpoints of earlier versions held the
    optimizer's tensors packed into one flat tensor per dtype: they come back unpacked."""
    if not (isinstance(state, dict) and state.get("format") == FORMAT):
        return state
    return {k: unpack_tensors(v) for k, v in state.items()}


def unpack_tensors(obj: Any) -> Any:
    """A structure packed by earlier versions (a skeleton, one flat tensor per dtype and an index
    of (pack, offset, ndim, shape...) rows) as it was, each tensor its own copy."""
    if not (isinstance(obj, dict) and PACKED in obj and "flat" in obj):
        return obj
    flat = obj["flat"]
    tensors = []
    for g, offset, ndim, *dims in obj["index"].tolist():
        shape = dims[:ndim]
        n = math.prod(shape)
        tensors.append(flat[g][offset:offset + n].view(shape).clone())

    def fill(o: Any) -> Any:
        if type(o) is dict:
            if len(o) == 1 and PACKED in o:
                return tensors[o[PACKED]]
            return {k: fill(v) for k, v in o.items()}
        if type(o) in (list, tuple):
            return type(o)(fill(v) for v in o)
        return o

    return fill(obj[PACKED])


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True; never retry without it. Every record's bytes are checked
    against the archive's CRC-32 as they are read. Errors name the file, on one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    records, problem = _records(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    reader = None
    try:
        with open(path, "rb", buffering=0) as raw:
            reader = _CheckedReader(raw, records)
            try:
                state = torch.load(reader, map_location=map_location, weights_only=True)
                reader.check_unread()
            finally:
                reader.close()
    except pickle.UnpicklingError as exc:
        _raise_damaged(path, reader, exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found or "weights_only" in str(exc).lower() and "global" in str(exc).lower():
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path}: refused to load: it holds pickled objects{what} beyond plain tensors and"
                " data, which could run code; nothing in it was run. Use only checkpoints you trust"
                " that torchkiln wrote"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupted): {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file can fail in any of torch's readers
        _raise_damaged(path, reader, exc)
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupted): {_first_line(exc)}") from None
    return decode(state)


def _raise_damaged(path: Path, reader: _CheckedReader | None, exc: BaseException) -> None:
    if reader is not None and reader.bad:
        raise CheckpointError(f"{path}: corrupted checkpoint (record {reader.bad} fails its checksum)") from None


class _CheckedReader:
    """The file object torch.load reads a checkpoint through: each record's bytes, read whole
    into their tensor's memory (`readinto`), are checked against the record's CRC-32 right there.
    `records`: the archive's records by the offset of their local header."""

    def __init__(self, raw: Any, records: dict[int, zipfile.ZipInfo]):
        self.raw, self.records = raw, records
        self.data_at: dict[int, zipfile.ZipInfo] = {}  # record data offset -> record
        self.checked: set[str] = set()
        self.bad: str | None = None
        self._pool = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self._check(self.raw.tell() - len(data), memoryview(data))
        return data

    def readinto(self, buffer: Any) -> int:
        at = self.raw.tell()
        view = memoryview(buffer).cast("B")
        info = self.data_at.get(at)
        if info is not None and len(view) == info.file_size >= 2 * CHECK_CHUNK:
            n, crc = self._read_checking(view)  # a big record: read and checksum side by side
            self._verdict(info, crc if n == len(view) else None)
            return n
        n = self._read_into(view)
        self._check(at, view[:n])
        return n

    def _read_into(self, view: memoryview) -> int:
        n, size = 0, len(view)
        while n < size:  # a raw read may return fewer bytes than asked
            got = self.raw.readinto(view[n:])
            if not got:
                break
            n += got
        return n

    def _read_checking(self, view: memoryview) -> tuple[int, int]:
        """Read `view` chunk by chunk while another thread checksums the chunks already read
        (the checksum lets go of the GIL): the check costs what is left of it after the reading. Every
        chunk's checksum is done before this returns (the memory is the caller's)."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkiln-crc")
        crc, n, last = [0], 0, None

        def add(chunk: memoryview) -> None:
            crc[0] = crc32(chunk, crc[0])

        try:
            while n < len(view):
                got = self._read_into(view[n:n + CHECK_CHUNK])
                if not got:
                    break
                last = self._pool.submit(add, view[n:n + got])
                n += got
        finally:
            if last is not None:
                last.result()  # one worker: the chunks were summed in order
        return n, crc[0]

    def _check(self, at: int, data: memoryview) -> None:
        info = self.records.get(at)
        if info is not None and len(data) == 30 and data[:4] == b"PK\x03\x04":  # a local header
            name_len, extra_len = struct.unpack("<HH", data[26:30])
            self.data_at[at + 30 + name_len + extra_len] = info
            return
        info = self.data_at.get(at)
        if info is not None and len(data) == info.file_size:
            self._verdict(info, crc32(data))

    def _verdict(self, info: zipfile.ZipInfo, crc: int | None) -> None:
        if crc is None:
            return  # short read: torch.load reports the truncation
        if crc != info.CRC:
            self.bad = self.bad or info.filename
            raise CheckpointError(f"record {info.filename} fails its checksum")
        self.checked.add(info.filename)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def check_unread(self) -> None:
        """Check the records torch.load did not read whole through `readinto` (if any)."""
        unread = [i for i in self.records.values() if i.filename not in self.checked]
        if not unread:
            return
        with zipfile.ZipFile(self.raw) as archive:
            for info in unread:
                with archive.open(info) as member:  # zipfile checks the CRC at the end
                    while member.read(1 << 20):
                        pass


def _records(path: Path) -> tuple[dict[int, zipfile.ZipInfo], str | None]:
    """The archive's records by header offset, or why this file cannot be a torch.save archive."""
    size = path.stat().st_size
    if size == 0:
        return {}, "empty file (a checkpoint write that never finished?)"
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            return {}, f"corrupted checkpoint ({_first_line(exc)})"
        if any(i.header_offset + i.file_size > size for i in infos):
            return {}, f"truncated checkpoint ({size} bytes; records end past the end of the file)"
        return {i.header_offset: i for i in infos}, None
    if head == b"PK\x03\x04":
        return {}, f"truncated checkpoint ({size} bytes; the end of the archive is missing)"
    if head[:1] == b"\x80":
        return {}, None  # torch's legacy (pre-1.6) format: torch.load judges it
    return {}, f"not a PyTorch checkpoint (wrong file type; it starts with {head!r})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:160] if text else type(exc).__name__)


def model_weights(state: dict[str, Any], path: str | Path = "checkpoint",
                  averaged: bool = True) -> dict[str, torch.Tensor]:
    """The weights to infer with from a torchkiln checkpoint (or the file itself if it is a state_dict):
    the averaged weights (EMA, SWA) when the checkpoint holds them and `averaged`, else the
    training weights (`state["model"]`, what a resume continues from)."""
    if isinstance(state, dict) and state.get("format") == FORMAT:
        held = state.get(AVERAGED)
        return held["weights"] if averaged and isinstance(held, dict) else state["model"]
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state
    raise CheckpointError(f"{path}: neither a torchkiln checkpoint nor a state_dict")


def weights_kind(state: dict[str, Any]) -> str:
    """Which weights `model_weights` gives: "ema", "swa" (averaged) or "model" (the training weights)."""
    held = state.get(AVERAGED) if isinstance(state, dict) else None
    return str(held.get("kind", "averaged")) if isinstance(held, dict) else "model"


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove torch.compile's `_orig_mod.` and DDP's `module.` prefixes from keys."""
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load `weights` (prefixes of compiled or DDP-wrapped modules stripped) into `model`; a mismatch
    names the first missing, unexpected and mis-shaped keys."""
    weights = strip_prefixes(weights)
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    mismatched = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}")
        if mismatched:
            k = mismatched[0]
            parts.append(f"shape of {k}: checkpoint {tuple(weights[k].shape)}, model {tuple(own[k].shape)}")
        raise CheckpointError(f"checkpoint does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(weights, strict=strict)


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """A saved optimizer state replaces the optimizer's settings with its own (torch keeps the
    saved param groups), so one of another optimizer type loads and then fails at the first step
    (SGD's KeyError 'momentum' on an Adam state). Refused here, naming what is missing."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list):
        raise CheckpointError("its optimizer entry is not an optimizer state_dict")
    missing = sorted({k for g in groups if isinstance(g, dict) for k in optimizer.defaults if k not in g})
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise CheckpointError(
            f"its optimizer state is not {type(optimizer).__name__}'s (it has no {shown}): a resume continues"
            " the run's own optimizer; resume without changing optimizer.type, or start a new run from"
            " its weights (model.pretrained: CKPT)")

