"""The benchmark scripts run (tiny settings) and their side-by-side checks hold; no timing assertions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """benchmarks/NAME.py as the module NAME: the one module a script that imports it gets too
    (epoch_growth imports overhead; a second copy would register overhead's model twice)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_logging_overhead_script_times_logging_directly(tmp_path):
    bench = load_script("logging_overhead")
    out = tmp_path / "logging.md"
    assert bench.main(["--epochs", "2", "--repeat", "1", "--rounds", "1", "--device", "cpu", "--out", str(out)]) == 0
    rows = {line.split("|")[1].split("(the")[0].strip(): line.split("|")[2:-1] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| loggers")}
    assert set(rows) == {"no loggers", "every_n_steps 1", "every_n_steps 10 (default)", "every_n_steps 50"}
    inside = {k: float(v[1]) for k, v in rows.items() if k != "no loggers"}
    assert all(us > 0 for us in inside.values())
    # Flushing every step costs more logging time than flushing every 50: the direct timer sees it.
    assert inside["every_n_steps 1"] > inside["every_n_steps 50"]


@pytest.mark.slow
def test_overhead_script_runs_every_variant_and_losses_agree(tmp_path):
    overhead = load_script("overhead")
    out = tmp_path / "overhead.md"
    variants = [n for n in overhead.VARIANTS if importlib.util.find_spec("lightning") or "lightning" not in n]
    code = overhead.main(["--epochs", "2", "--repeats", "1", "--no-warmup", "--variants", ",".join(variants),
                          "--out", str(out)])
    assert code == 0  # 1 when torchkiln's final losses differ from the hand loop's
    main_table, phase_table = out.read_text().split("Where the extra time goes")

    def table_rows(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")]

    rows = table_rows(main_table)
    assert len(rows) == len(variants)
    assert sum("| 1.000x | 1.00-1.00 |" in r for r in rows) >= 2  # each hand loop is its own reference
    # Every variant saw the same batches and dropout masks: one set of final losses.
    assert len({tuple(r.split("|")[-4:-1]) for r in rows}) == 1
    # The extra milliseconds by phase, for every variant but the hand loops (one round: the parts add up).
    phases = table_rows(phase_table)
    assert len(phases) == len(variants) - 2
    for row in phases:
        train, val, end, total = (float(c) for c in row.strip("| ").split(" | ")[-4:])
        assert total == pytest.approx(train + val + end, abs=0.02)


def test_overhead_hand_loop_and_torchkiln_match_on_both_data_paths(tmp_path):
    overhead = load_script("overhead")
    setup = overhead.make_setup(2, tmp_path, [])
    rows = {}
    for name in ("hand-slicing", "torchkiln-off", "hand-dataloader"):
        timing, result = overhead.run_variant(name, setup)
        assert len(timing.starts) == 2 and timing.total > 0
        rows[name] = overhead.Row(name, [timing], result)
    assert overhead.check_agreement(rows, rtol=1e-5) == []
    # Bitwise the same losses (accuracy: torchkiln's is a float32 from torchmetrics).
    assert rows["hand-slicing"].result[:2] == rows["hand-dataloader"].result[:2] == rows["torchkiln-off"].result[:2]
    # The check fails when the numbers differ.
    rows["torchkiln-off"].result = (rows["torchkiln-off"].result[0] * 1.01, *rows["torchkiln-off"].result[1:])
    assert overhead.check_agreement(rows, rtol=1e-5)


def test_epoch_order_is_torchkilns_sampler_order():
    from torchkiln.data.loaders import ResumableBatchSampler

    overhead = load_script("overhead")
    mine, theirs = overhead.EpochOrder(100, 16, seed=3), ResumableBatchSampler(100, 16, shuffle=True, seed=3)
    for epoch in range(3):
        theirs.set_epoch(epoch)
        assert list(mine) == list(theirs)


def test_time_to_accuracy_script(tmp_path, capsys):
    tta = load_script("time_to_accuracy")
    cfg = tmp_path / "mlp.yaml"
    cfg.write_text((ROOT / "configs" / "digits-mlp.yaml").read_text())
    out = tmp_path / "tta.md"
    assert tta.main(["--target", "0.5", "--seeds", "1", "--configs", str(cfg), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 1/1 |" in text and "Fastest:" in text
    # An unreachable target is reported as such, not as a time (3 epochs: long enough to say so).
    short = tmp_path / "mlp-3.yaml"
    short.write_text(cfg.read_text().replace("trainer: {epochs: 20,", "trainer: {epochs: 3,"))
    assert short.read_text() != cfg.read_text()
    assert tta.main(["--target", "1.01", "--seeds", "1", "--configs", str(short), "--out", str(out)]) == 0
    assert "| 0/1 |" in out.read_text() and "not reached in 3 epochs" in capsys.readouterr().out


def test_metric_buffer_gives_the_per_batch_metrics():
    from torchkiln.engine.metric_buffer import MetricBuffer
    from torchkiln.tasks.base import ClassificationTask

    task = ClassificationTask()
    one, buffered = (task.build_metrics(["accuracy", "f1_macro", "balanced_accuracy"], 5) for _ in range(2))
    buf = MetricBuffer(task, buffered, batches=4)
    g = torch.Generator().manual_seed(0)
    for size in (8, 8, 3, 8, 8, 8, 1):  # flushes after 4 batches, holds the last 3
        out, y = torch.randn(size, 5, generator=g), torch.randint(0, 5, (size,), generator=g)
        task.update_metrics(one, out, y)
        buf.add(out, y)
    assert buf._outputs  # batches are held until flushed
    buf.flush()
    a, b = one.compute(), buffered.compute()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_metric_buffer_updates_at_once_for_tasks_without_concat():
    from torchkiln.engine.metric_buffer import MetricBuffer
    from torchkiln.tasks.base import ClassificationTask

    class PerBatch(ClassificationTask):
        concat_metric_updates = False

    task = PerBatch()
    metrics = task.build_metrics(["accuracy"], 3)
    buf = MetricBuffer(task, metrics)
    buf.add(torch.tensor([[5.0, 0, 0]]), torch.tensor([0]))
    assert not buf._outputs and float(metrics.compute()["accuracy"]) == 1.0


def test_image_loading_script_compares_decoders_and_loaders(tmp_path):
    bench = load_script("image_loading")
    out = tmp_path / "images.md"
    bench.main(["--sizes", "16", "--images", "64", "--workers", "0", "--repeats", "1", "--decode-repeats", "2",
                "--out", str(out)])
    text = out.read_text()
    decoders = [line for line in text.splitlines() if line.startswith(("| jpg 16px", "| png 16px"))]
    assert len(decoders) == 2 and all(line.endswith("| same |") for line in decoders)  # the same pixels
    loaders = [line for line in text.splitlines() if line.startswith(("| jpg | 16 | 0 |", "| png | 16 | 0 |"))]
    assert len(loaders) == 2 and all(line.count("x)") == 3 for line in loaders)  # three torchkiln variants


def test_epoch_growth_script_pairs_epochs_with_the_hand_loop(tmp_path):
    bench = load_script("epoch_growth")
    out = tmp_path / "growth.md"
    assert bench.main(["--epochs", "4", "--repeats", "1", "--window", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 2-2 |" in text and "| 4-4 |" in text and "Target (last 1 epochs' extra" in text
    assert "End of the run" in text


def test_replacements_script_compares_like_with_like(tmp_path):
    """The removed event writer and TensorBoard's write the same scalars at the same steps; the
    confusion-matrix metrics and torchmetrics' give the same values (what the timing compares)."""
    bench = load_script("replacements")
    rows = bench._rows(25)
    bench.write_rows("torchkiln", tmp_path / "ours", rows, 10)
    bench.write_rows("tensorboard", tmp_path / "tb", rows, 10)
    ours, tb = bench.read_scalars(tmp_path / "ours"), bench.read_scalars(tmp_path / "tb")
    assert ours == tb and [s for s, _ in tb["train/loss_step"]] == list(range(1, 26))
    batches = bench._batches(10, 5)
    _, a = bench.epoch_metrics("torchkiln", 10, batches, group=2)
    _, b = bench.epoch_metrics("torchmetrics", 10, batches, group=2)
    assert a.keys() == b.keys() == {"accuracy", "f1_macro"}
    assert all(abs(a[k] - b[k]) < 1e-6 for k in a) and 0 < a["accuracy"] < 1
    ms, png = bench.picture_ms("tensorboard", tmp_path / "pic", n=2)
    assert ms > 0 and png > 1000 and len(bench.read_images(tmp_path / "pic")) == 2
