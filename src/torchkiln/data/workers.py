"""DataLoader workers started by spawn or forkserver (macOS, Windows, a `multiprocessing_context`)
get the dataset pickled: a class defined in a notebook cannot be imported there, which torch reports
as a worker crash. Say so once, before the first batch, in one line."""

from __future__ import annotations

import multiprocessing
import pickle
import sys
import weakref
from typing import Any

from torch.utils.data import DataLoader

from torchkiln.data.wrappers import unwrap
from torchkiln.errors import DataError

_checked: weakref.WeakSet = weakref.WeakSet()


def start_method(loader: DataLoader) -> str:
    ctx = loader.multiprocessing_context
    if isinstance(ctx, str):
        return ctx
    return ctx.get_start_method() if ctx is not None else multiprocessing.get_start_method()


def _from_interactive_main(obj: Any) -> bool:
    """Defined in a notebook cell (or an interactive `__main__` without a file a worker could import)."""
    cls = obj if isinstance(obj, type) or (callable(obj) and hasattr(obj, "__qualname__")) else type(obj)
    main = sys.modules.get("__main__")
    return getattr(cls, "__module__", None) == "__main__" and not hasattr(main, "__file__")


def check_worker_pickling(loader: Any) -> None:
    """Refuse, with what to do, a loader whose workers could not rebuild its dataset or functions."""
    if not isinstance(loader, DataLoader) or loader.num_workers == 0 or loader in _checked:
        return
    _checked.add(loader)
    method = start_method(loader)
    if method == "fork":  # the workers are copies of this process: nothing is pickled
        return
    fix = (f"move it into a .py file and import it from there, or set num_workers=0 (DataLoader workers"
           f" started by '{method}' import what they unpickle)")
    found, _ = unwrap(loader.dataset, _from_interactive_main)
    if _from_interactive_main(found):
        raise DataError(f"the Dataset {type(found).__name__} is defined in the notebook, where the DataLoader's"
                        f" {loader.num_workers} worker processes cannot import it: {fix}")
    for role, fn in (("collate_fn", loader.collate_fn), ("worker_init_fn", loader.worker_init_fn)):
        if fn is not None and _from_interactive_main(fn):
            raise DataError(f"the DataLoader's {role} {getattr(fn, '__qualname__', fn)} is defined in the"
                            f" notebook, where its worker processes cannot import it: {fix}")
    try:
        pickle.dumps(loader.dataset)
    except Exception as exc:
        raise DataError(f"the Dataset {type(loader.dataset).__name__} cannot be pickled for the DataLoader's"
                        f" worker processes ({type(exc).__name__}: {exc}): keep lambdas, open files and"
                        f" locks out of it, or set num_workers=0") from exc
