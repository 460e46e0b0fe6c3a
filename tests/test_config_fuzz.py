"""Configs a user might write by mistake never end in a traceback: `kiln` exits 0, or 2 with one line.

Random YAML text and mutations of a valid config (a wrong type or value at any key of the resolved
config, unknown keys, removed sections) go through `kiln config check`, which builds every part of
the run; a mutation that passes the check is also trained for one epoch.
"""

from __future__ import annotations

import contextlib
import io
import traceback
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import small_config
from torchkiln.cli import main
from torchkiln.config.load import resolve
from torchkiln.config.schema import to_plain

pytestmark = pytest.mark.slow

BASE = small_config(Path("/nonexistent"), trainer={"epochs": 1, "monitor": "val/accuracy"},
                    logging={"progress": False, "plots": False, "tensorboard": False, "csv": False})


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))


RESOLVED = to_plain(resolve(BASE))
PATHS = sorted(set(_paths(RESOLVED)) | set(_paths(BASE)))

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.sampled_from(["abc", "1e-3", "auto", "val/loss", "max", "-1", "[1, 2]"]),
    st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(st.sampled_from(["type", "args", "x"]),
                                                              st.integers(0, 3), max_size=2),
)


def _set(cfg: dict, path: tuple, value) -> dict:
    node = cfg
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
    return cfg


def _run(args: list[str]) -> tuple[int, str]:
    import torch

    threads = torch.get_num_threads()  # a fuzzed trainer.threads sets this process's count
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse
            code = exc.code
        except BaseException:
            raise AssertionError(f"kiln {' '.join(args)} raised:\n{traceback.format_exc()}") from None
    return code, err.getvalue()


def _check_outcome(code: int, err: str, text: str) -> None:
    assert code in (0, 2), f"exit {code} for:\n{text}\n{err}"
    if code == 2:
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, f"for:\n{text}\n{err}"


def _try(tmp: Path, text: str, train: bool) -> None:
    path = tmp / "fuzz.yaml"
    path.write_text(text)
    code, err = _run(["config", "check", "-c", str(path)])
    _check_outcome(code, err, text)
    if code == 0 and train:
        code, err = _run(["train", "-q", "-c", str(path), f"output_dir={tmp / 'runs'}"])
        _check_outcome(code, err, text)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mutations=st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=3),
       train=st.booleans())
@example(mutations=[(("model", "args", "num_classes"), None)], train=True)  # found by this test
@example(mutations=[(("trainer", "device"), "")], train=False)  # found by this test
@example(mutations=[(("optimizer", "args", "lr"), "abc")], train=False)  # issue 15
def test_mutated_configs_end_in_exit_0_or_one_line(tmp_path_factory, mutations, train):
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    cfg["output_dir"] = str(tmp / "runs")
    for path, value in mutations:
        _set(cfg, path, value)
    _try(tmp, yaml.safe_dump(cfg, sort_keys=False), train)
    assert not (tmp / "runs").exists() or train  # config check writes nothing


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(text=st.one_of(
    st.text(max_size=80),
    st.sampled_from(["", "{", "- 1\n- 2", "a: [", "data: 3", "!!python/object:os.system x", "model: {type: }",
                     "trainer: {epochs: 1e400}", "\t- x", "name: [1]", "{a: 1, a: 2}", "seed: .nan"]),
))
def test_random_yaml_text_ends_in_exit_0_or_one_line(tmp_path_factory, text):
    _try(tmp_path_factory.mktemp("fuzz"), text, train=False)
