"""Whether this process is a Jupyter (or Colab) kernel: progress bars, Ctrl-C and the TensorBoard
line behave differently there."""

from __future__ import annotations

import sys


def in_notebook() -> bool:
    """True inside an IPython kernel (Jupyter, JupyterLab, VS Code, Colab), not in a terminal IPython."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def has_widgets() -> bool:
    """ipywidgets is importable (`pip install 'torchkiln[notebook]'`): progress bars are widgets."""
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None
