"""TensorBoard event files, written on the caller's thread into a buffered file.

An event file is a sequence of records, each `length (uint64 LE) | masked CRC32C of the length |
an Event proto | masked CRC32C of the proto`. TensorBoard's own writer hands every event to a
writer thread through a queue: about 30 us per event on a 2-core machine, most of it the queue's
lock passing back and forth between the two threads. Written here, a scalar row costs a few us and
the file is flushed once per batch of rows.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

_files = itertools.count()


def _crc32c() -> Callable[[bytes], int]:
    """CRC32C: google-crc32c's (C where built), else TensorBoard's pure-Python one (masked there)."""
    try:
        import google_crc32c

        return lambda data: google_crc32c.value(bytes(data))
    except ImportError:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c

        return crc32c


_crc = _crc32c()


def masked_crc32c(data: bytes) -> int:
    """The record checksum TFRecord files use: CRC32C rotated right by 15 bits plus a constant."""
    x = _crc(data)
    return ((((x >> 15) | (x << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """`data` framed as one TFRecord."""
    header = struct.pack("<Q", len(data))
    return b"".join((header, struct.pack("<I", masked_crc32c(header)), data,
                     struct.pack("<I", masked_crc32c(data))))


class EventFile:
    """A new `events.out.tfevents.*` file in `log_dir`.

    `purge_step` (a resume): TensorBoard drops the events of earlier files at or after this step,
    so what a resumed run logs again replaces what the stopped run had logged past its checkpoint.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self._event = Event
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
                               f".{os.getpid()}.{next(_files)}")
        self._file = open(self.path, "wb")
        self.write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self.write(Event(wall_time=time.time(), step=purge_step, file_version="brain.Event:2"))
            self.write(Event(wall_time=time.time(), step=purge_step,
                             session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def add_summary(self, summary, step: int | None = None) -> None:
        event = self._event(wall_time=time.time(), summary=summary)
        if step is not None:
            event.step = int(step)
        self.write(event)

    def write(self, event) -> None:
        self._file.write(record(event.SerializeToString()))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
