"""examples/quickstart.ipynb runs in a real Jupyter kernel (nbclient + ipykernel), followed in the same
kernel by the notebook behaviours: the progress bar as tqdm's widget with ipywidgets (the dev extra
has it) and as a text bar once ipywidgets cannot be imported, with no tqdm warning either way; the
`%tensorboard` line; an interrupt (SIGINT, what "interrupt the kernel" sends) that writes the
checkpoint and returns from fit; and the one-line message for a cell's Dataset that spawned
DataLoader workers cannot import."""

from __future__ import annotations

import os

import nbformat
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"

BEHAVIOURS = [
    '''import os, signal
from torchkiln import Callback

class CtrlC(Callback):  # interrupting the kernel sends SIGINT to it: here, at step 3
    def on_step_end(self, trainer, info):
        if info.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

model2 = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
t2 = make_trainer(model2, torch.optim.AdamW(model2.parameters(), lr=1e-2), nn.CrossEntropyLoss(), epochs=2,
                  run_dir="runs/interrupted", callbacks=[CtrlC()])
s2 = t2.fit(train_loader, val_loader)
last = Path("runs/interrupted/checkpoints/last.ckpt")
print("returned at step", s2["global_step"], "of", 2 * len(train_loader), "last.ckpt:", last.is_file())
s3 = t2.fit(train_loader, val_loader, resume=str(last))
print("resumed to step", s3["global_step"])''',
    '''from torch.utils.data import Dataset
from torchkiln.errors import DataError

class CellDigits(Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, i):
        return x[i], y[i]

from torch.utils.data import DataLoader

spawned = DataLoader(CellDigits(), batch_size=64, num_workers=1, multiprocessing_context="spawn")
try:
    make_trainer(model, optimizer, nn.CrossEntropyLoss(), epochs=1).fit(spawned)
except DataError as exc:
    print("DataError:", exc)''',
    '''import sys

sys.modules["ipywidgets"] = None  # as in a kernel without ipywidgets: `import ipywidgets` fails
model3 = nn.Sequential(nn.Linear(64, 10))
make_trainer(model3, torch.optim.AdamW(model3.parameters(), lr=1e-2), nn.CrossEntropyLoss(), epochs=1,
             run_dir="runs/text_bar").fit(train_loader)''',
    'print("kernel alive")',
]
WIDGET = "application/vnd.jupyter.widget-view+json"  # the display of an ipywidgets widget


def texts(cell, name: str | None = None) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream"
                   and (name is None or o.name == name))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    from nbclient import NotebookClient

    home = tmp_path_factory.mktemp("notebook")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    own = len(nb.cells)
    nb.cells += [nbformat.v4.new_code_cell(src) for src in BEHAVIOURS]
    kept = {key: os.environ.get(key) for key in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), kept["PYTHONPATH"]]))  # the kernel's
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread: the suite runs two workers on two cores
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(home)}}).execute()
    finally:
        for key, value in kept.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    return home, nb.cells[:own], nb.cells[own:]


def test_the_quickstart_runs_without_errors_and_writes_its_run_directory(executed):
    home, cells, _ = executed
    code = [c for c in cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    run = home / "runs" / "quickstart"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "metrics.csv").is_file()
    assert (run / "tensorboard").is_dir()
    assert "best val/accuracy 0.9" in "".join(texts(c) for c in code)


def widgets(cell) -> list[dict]:
    return [o.data[WIDGET] for o in cell.outputs if o.output_type == "display_data" and WIDGET in o.data]


def test_progress_is_a_widget_with_ipywidgets_and_the_tensorboard_line(executed):
    _, cells, _ = executed
    fit = next(c for c in cells if c.cell_type == "code" and "trainer.fit" in c.source)
    assert "%tensorboard --logdir runs/quickstart/tensorboard" in texts(fit, "stdout")
    [bar] = widgets(fit)  # tqdm.notebook's bar: one widget for the whole run
    assert bar["model_id"]
    assert "epoch 1/3" not in texts(fit, "stderr")  # and no text bar beside it
    everything = "".join(texts(c) for c in cells if c.cell_type == "code")
    assert "IProgress" not in everything and "TqdmWarning" not in everything and "Warning" not in everything


def test_progress_falls_back_to_text_without_ipywidgets_with_no_warning(executed):
    _, _, (_, _, text_bar, _) = executed
    assert not widgets(text_bar) and not [o for o in text_bar.outputs if o.output_type == "error"]
    bar = texts(text_bar, "stderr")
    assert "epoch 1/1" in bar and "batch" in bar  # tqdm's text bar, drawn in the cell
    assert "IProgress" not in bar and "Warning" not in bar


def test_an_interrupt_writes_the_checkpoint_and_fit_returns(executed):
    _, _, (interrupt, _, _, alive) = executed
    out = texts(interrupt, "stdout")
    assert "interrupted: finishing this step and writing the checkpoint" in out
    assert "continue with trainer.fit(train_loader, val_loader, resume='runs/interrupted/checkpoints/last.ckpt')" in out
    returned = next(line for line in out.splitlines() if line.startswith("returned at step"))
    step, total = int(returned.split()[3]), int(returned.split()[5])
    assert 3 <= step < total and returned.endswith("last.ckpt: True")
    assert f"resumed to step {total}" in out
    assert not [o for o in interrupt.outputs if o.output_type == "error"]
    assert "kernel alive" in texts(alive)


def test_a_cells_dataset_with_spawned_workers_is_one_clear_message(executed):
    _, _, (_, spawned, _, _) = executed
    [line] = [ln for ln in texts(spawned).splitlines() if ln.startswith("DataError:")]
    assert "the Dataset CellDigits is defined in the notebook" in line
    assert "move it into a .py file" in line and "num_workers=0" in line
