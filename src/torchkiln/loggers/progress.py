"""Console progress: a bar per epoch on a terminal or in a notebook, one line per epoch otherwise.

In a notebook the bar is a widget with ipywidgets (`torchkiln[notebook]`), else tqdm's text bar:
chosen here, so tqdm.auto's warning about missing widgets never appears."""

from __future__ import annotations

import logging
import sys
import time

from torchkiln.notebook import has_widgets, in_notebook

log = logging.getLogger("torchkiln")


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.notebook = stream is None and in_notebook()
        self.bar = None
        self.start = 0.0
        self.samples = 0

    @property
    def interactive(self) -> bool:
        return self.enabled and (self.notebook or (hasattr(self.stream, "isatty") and self.stream.isatty()))

    def epoch_start(self, epoch: int, epochs: int, total: int, done: int = 0) -> None:
        self.start = time.perf_counter()
        self.samples = 0
        if not self.interactive:
            return
        desc = f"epoch {epoch}/{epochs}"
        if self.bar is None:
            if self.notebook and has_widgets():
                from tqdm.notebook import tqdm
            else:
                from tqdm.std import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, file=self.stream, leave=False,
                            dynamic_ncols=True, unit="batch")
        else:  # one bar for the whole run: making and closing one per epoch cost ~0.4 ms an epoch
            self.bar.set_description_str(desc, refresh=False)
            self.bar.reset(total=total)
            if done:
                self.bar.update(done)

    def advance(self, batches: int, samples: int) -> None:
        self.samples += samples
        if self.bar is not None:
            self.bar.update(batches)

    def show(self, values: dict[str, float]) -> None:
        if self.bar is not None:
            rate = self.samples / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in values.items()}, "samples/s": f"{rate:.0f}"},
                                 refresh=False)

    def clear(self) -> None:
        if self.bar is not None:
            self.bar.clear()  # the epoch's line takes its place; the next epoch draws it again

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def log_epoch_line(epoch: int, epochs: int, record: dict[str, float]) -> None:
    """The epoch's line: always in train.log; the console shows it unless --quiet."""
    shown = "  ".join(f"{k} {v:.0f}" if k.startswith(("memory/", "gpu/")) else f"{k} {v:.4f}"
                      for k, v in record.items() if "/" in k and not k.startswith(("lr", "time/")))
    log.info("epoch %d/%d  %s  (%.1fs, %.0f samples/s)", epoch, epochs, shown,
             record.get("time/epoch_s", 0.0), record.get("time/samples_per_s", 0.0))
