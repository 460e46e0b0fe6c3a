"""What a run does differently in a notebook (make_trainer adds this there): the `%tensorboard` line
to watch it, and Ctrl-C ("interrupt the kernel") finishing the current step, writing the checkpoint
and returning from `fit` with the kernel alive and ready to resume."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from torchkiln.engine.callbacks import Callback
from torchkiln.engine.state import StopRequested


class NotebookSupport(Callback):
    """A first interrupt asks the run to stop after the current step (a second one raises
    KeyboardInterrupt at once); `fit` then returns its summary instead of raising."""

    rank_zero_only = True

    def __init__(self, stream: Any = None):
        self.stream = stream
        self.previous: Any = None
        self.installed = False
        self.requested = False

    def _write(self, line: str) -> None:
        out = self.stream or sys.stdout
        out.write(line + "\n")
        out.flush()

    def on_fit_start(self, trainer: Any) -> None:
        from torchkiln.loggers.tensorboard import TensorBoardLogger

        for logger in trainer.hub.loggers:
            if isinstance(logger, TensorBoardLogger):
                self._write(f"watch this run: %load_ext tensorboard\n%tensorboard --logdir {logger.log_dir}")
        self.requested = False
        # Only where the kernel's own handler is in place: a command's handler (kiln train) is kept.
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._interrupt(trainer))
            self.installed = True

    def _interrupt(self, trainer: Any):
        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            trainer.request_stop(signum)
            self._write("interrupted: finishing this step and writing the checkpoint (interrupt again to quit now)")

        return handler

    def _restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)
            self.installed = False

    def on_exception(self, trainer: Any, error: BaseException) -> bool:
        self._restore()
        if not (self.requested and isinstance(error, StopRequested)):
            return False
        trainer.request_stop(None)  # served: the next fit (the resume) runs
        loop = trainer.loop
        where = f"epoch {loop.epoch + 1}, step {loop.global_step}"
        if error.checkpoint is None:
            self._write(f"stopped at {where}; nothing was saved (no run_dir)")
        else:
            self._write(f"stopped at {where}; checkpoint {error.checkpoint}\ncontinue with"
                        f" trainer.fit(train_loader, val_loader, resume={str(error.checkpoint)!r})")
        return True

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        self._restore()
