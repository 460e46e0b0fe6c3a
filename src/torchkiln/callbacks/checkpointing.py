"""The checkpoint policy: best.ckpt when the monitor improves, last.ckpt every epoch, numbered
epoch-NNN.ckpt every `save_period` epochs and step-NNNNNN.ckpt every `every_n_steps` optimizer
steps (the newest `keep_last` of those kept), and last.ckpt when a stop is requested mid-epoch.

Every rank takes part (the state is a collective under DDP); rank 0 writes, the others wait.
Under FSDP each checkpoint also has its folder of shards, which every rank writes (engine/dcp.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torchkiln.engine import dcp, distributed
from torchkiln.engine.callbacks import Callback, StepInfo
from torchkiln.engine.checkpoint import CheckpointWriter, clean_stale_temps
from torchkiln.errors import CheckpointError, SettingError
from torchkiln.rundir import BEST, CHECKPOINTS, LAST, NUMBERED, epoch_name, step_name

log = logging.getLogger("torchkiln")


class Checkpointing(Callback):
    """`run_dir` None: a policy that writes nothing until `use_dir` names the run directory (a
    command builds and checks everything first, then makes the directory). `config`: plain data
    stored in every checkpoint (the resolved config, so a checkpoint can rebuild its model)."""

    def __init__(self, run_dir: str | Path | None = None, *, save_period: int | None = None,
                 every_n_steps: int | None = None, keep_last: int | None = None, background: bool = True,
                 config: dict[str, Any] | None = None):
        for name, value in (("save_period", save_period), ("checkpoint_every_steps", every_n_steps),
                            ("keep_last", keep_last)):
            if value is not None and int(value) < 1:
                raise SettingError(name, f"expected at least 1; found {value}")
        self.directory = Path(run_dir) / CHECKPOINTS if run_dir is not None else None
        self.config = config
        self.save_period = save_period
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        # By default this thread takes one snapshot of the state (host memory, pinned for a GPU's
        # tensors) and the writer thread serializes it into the file (fsync, rename, second names)
        # behind training, in order: the write is mostly waiting on the disk. Inline, the state is
        # streamed into the file from where it lives, with no copy at all.
        self.writer = CheckpointWriter(background=background)

    def use_dir(self, run_dir: str | Path) -> None:
        self.directory = Path(run_dir) / CHECKPOINTS

    @property
    def last(self) -> Path | None:
        return self.directory / LAST if self.directory is not None else None

    def save_last(self, state: dict[str, Any]) -> Path | None:
        """last.ckpt from `state` now, written before this returns (every rank calls it; rank 0
        writes); None without a directory. An out-of-memory stop saves the state before its step."""
        if self.directory is None:
            return None
        self._save(state, LAST)
        self.writer.wait()
        return self.last

    def on_fit_start(self, trainer: Any) -> None:
        if self.directory is not None and distributed.is_rank0():
            self.directory.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(self.directory)
            dcp.clean_partial(self.directory)

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        due = self.every_n_steps is not None and info.step % self.every_n_steps == 0
        if self.directory is None or not (due or trainer.stopping is not None) or info.last_in_epoch:
            return  # the epoch's end writes last.ckpt anyway
        state = self._state(trainer)
        written = self._save(state, step_name(info.step), numbered=True) if due else None
        self._save(state, LAST, copy_of=written)

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, float]) -> None:
        if self.directory is None:
            return
        state = self._state(trainer)
        written = None  # serialize once: the epoch's other files copy the first one's bytes
        if trainer.loop.best_epoch == epoch + 1:
            written = self._save(state, BEST)
        if self.save_period and (epoch + 1) % self.save_period == 0:
            written = self._save(state, epoch_name(epoch + 1), numbered=True, copy_of=written)
        self._save(state, LAST, copy_of=written)

    def on_save_checkpoint(self, trainer: Any, state: dict[str, Any]) -> None:
        state["config"] = self.config

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        try:  # what was handed over still reaches the disk; the error in flight is the one to report
            self.writer.wait()
        except CheckpointError as exc:
            log.error("%s", exc)

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        try:
            self.writer.wait()  # a failed write raises here
        finally:
            self.writer.close()  # its thread ends with the run (made again if needed)

    def _save(self, state: dict[str, Any], name: str, numbered: bool = False,
              copy_of: Path | None = None) -> Path | None:
        """Hand `name` to the writer (rank 0); `copy_of`, a file handed over just before from the
        same `state`, gets a second name instead of a second serialization."""
        folder = None
        if dcp.SHARDED in state:  # every rank writes its shard; the .ckpt names the folder
            state, folder = dcp.save(state, self.directory, name)
            copy_of = None  # each name has its own folder, so its own .ckpt
        if not distributed.is_rank0():  # rank duties: rank 0 writes, the others wait for it
            distributed.barrier()
            return None
        try:
            path = self.writer.save(state, self.directory / name, copy_of=copy_of)
        finally:
            distributed.barrier()
        # Older shard folders of this name go once the .ckpt naming the new one (or none) is written.
        self.writer.run(dcp.drop_older, self.directory, name, folder or "")
        if numbered and self.keep_last:
            self.writer.run(_prune_numbered, self.directory, self.keep_last)
        return path

    def _state(self, trainer: Any) -> dict[str, Any]:
        state = trainer.state_dict()
        return dcp.prepare(trainer, state) if dcp.is_sharded(trainer.placement.train_model) else state


def _prune_numbered(directory: Path, keep: int) -> None:
    """Keep the newest `keep` numbered checkpoints (epoch-NNN.ckpt, step-NNNNNN.ckpt)."""
    numbered = sorted((p for p in directory.glob("*.ckpt") if NUMBERED.match(p.name)),
                      key=lambda p: p.stat().st_mtime_ns)
    for old in numbered[:-keep]:
        old.unlink(missing_ok=True)
        dcp.drop_older(directory, old.name, keep="")  # its folder of shards, under FSDP
