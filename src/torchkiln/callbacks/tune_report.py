"""`TuneReport`: a `kiln tune` trial reports every epoch to Ray Tune, with its checkpoint.

It reports once the epoch's checkpoint state is assembled (every other callback has acted on the
epoch by then), so the checkpoint Ray keeps is the epoch's whole state and a trial restored by Ray
continues from its own checkpoint exactly. When the search's scheduler (ASHA) stops the trial,
Ray ends the report with SystemExit: the run then ends after this epoch like an early stop, and
its summary and checkpoints are written as for any finished run. Outside a Ray Tune trial (a
trial's run resumed with `kiln train --resume`) it does nothing.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from torchkiln.engine.callbacks import Callback
from torchkiln.errors import ConfigError, did_you_mean
from torchkiln.rundir import LAST

log = logging.getLogger("torchkiln")
EPOCH = "epoch"  # the epochs done, in every report: ASHA's time attribute
_stopped = {"by_search": False}  # this process's trial (Ray runs one per worker process)


def stopped_by_search() -> bool:
    """True when the search's scheduler stopped this process's last trial: its function must then
    end as Ray ended the report (SystemExit), not return as a trial that ran to its end."""
    return _stopped["by_search"]


def in_trial() -> bool:
    """True inside a Ray Tune trial."""
    try:
        from ray import tune

        return tune.get_context().get_trial_id() is not None
    except Exception:  # no Ray, or no session: not a trial
        return False


class TuneReport(Callback):
    """`metric`: the number the search ranks trials by; it must be logged by the run."""

    rank_zero_only = True

    def __init__(self, metric: str | None = None):
        self.metric = metric
        self.active = False
        self._pending: tuple[int, dict[str, float]] | None = None

    def check(self, trainer: Any, logged: set[str]) -> None:
        if self.metric is not None and self.metric not in logged:
            raise ConfigError(f"tune.metric: '{self.metric}' will not be logged{did_you_mean(self.metric, logged)}"
                              f" (logged: {', '.join(sorted(logged))})")

    def on_fit_start(self, trainer: Any) -> None:
        self.active = in_trial()
        _stopped["by_search"] = False
        if not self.active:
            log.info("TuneReport: not inside a Ray Tune trial; nothing is reported")

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, float]) -> None:
        if self.active:
            numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
            self._pending = (epoch + 1, numbers)
            if trainer.checkpointing is None or trainer.checkpointing.directory is None:
                self._report(trainer, None)  # no checkpoint will be assembled this epoch

    def on_save_checkpoint(self, trainer: Any, state: dict[str, Any]) -> None:
        loop = state["loop"]
        if self._pending is None or loop["epoch"] != self._pending[0] or loop["batch_in_epoch"] != 0:
            return  # not the end of the epoch just logged (a mid-epoch checkpoint)
        if self._report(trainer, state):
            loop["stopped_early"] = True  # the checkpoint records the stop, like an early stop's

    def _report(self, trainer: Any, state: dict[str, Any] | None) -> bool:
        """Report the pending epoch; True when the search stopped the trial there."""
        from ray import tune

        epoch, numbers = self._pending
        self._pending = None
        with tempfile.TemporaryDirectory(prefix="kiln-tune-") as tmp:
            checkpoint = None
            if state is not None:
                from torchkiln.engine.checkpoint import save_checkpoint

                save_checkpoint({**state, "config": trainer.checkpointing.config}, Path(tmp) / LAST)
                checkpoint = tune.Checkpoint.from_directory(tmp)
            try:
                tune.report({**numbers, EPOCH: epoch}, checkpoint=checkpoint)  # Ray copies the folder
            except SystemExit:  # the scheduler stopped this trial (at max_t: its last epoch)
                _stopped["by_search"] = True
                if epoch >= trainer.epochs:
                    return False
                log.info("the search stopped this trial after epoch %d (a weaker %s than the others)",
                         epoch, self.metric or "monitor")
                trainer.stop_after_epoch()
                return True
        return False
