"""Models and transfer learning: backbones by name, local pretrained weights, head swap, freezing, summary."""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest
import torch

from conftest import kiln, small_config, write_config
from torchkiln.commands import train as run
from torchkiln.config.build import build_freezer, build_model, build_optimizer, check_components
from torchkiln.config.load import resolve
from torchkiln.engine.checkpoint import load_checkpoint, model_weights
from torchkiln.errors import CheckpointError, ConfigError
from torchkiln.models import SmallCNN, find_head, load_pretrained, register_model


def _train(cfg: dict):
    cfg["logging"] = {"progress": False, "tensorboard": False, "plots": False, **cfg.get("logging", {})}
    return run.train(resolve(cfg), progress=False)


def _weights(path) -> dict[str, torch.Tensor]:
    return model_weights(load_checkpoint(path), path)


def _digits(classes, **args):
    return {"dataset": {"type": "Digits", "args": {"classes": classes, **args}}, "val_split": 0.25,
            "test_split": 0.0, "batch_size": 32}


# ------------------------------------------------------------------------------------------
# transfer: train on 0-4, fine-tune a new head on 5-9 with the backbone frozen
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_finetune_new_head_on_frozen_backbone(tmp_path, caplog):
    cnn = {"type": "SmallCNN", "args": {"width": 16, "dropout": 0.0}}
    first = small_config(tmp_path, name="first", data=_digits([0, 1, 2, 3, 4]), model=cnn,
                         trainer={"epochs": 3, "monitor": "val/accuracy"})
    run_dir, summary = _train(first)
    assert summary["best"] > 0.9
    source = run_dir / "checkpoints" / "best.ckpt"

    second = small_config(
        tmp_path, name="second", data=_digits([5, 6, 7, 8, 9]),
        model={**cnn, "pretrained": str(source), "freeze": "backbone", "reset_head": True},
        optimizer={"type": "AdamW", "args": {"lr": 0.03, "weight_decay": 0.1}},
        trainer={"epochs": 4, "monitor": "val/accuracy"},
    )
    with caplog.at_level(logging.INFO, logger="torchkiln"):
        run_dir2, summary2 = _train(second)
    before, after = _weights(source), _weights(run_dir2 / "checkpoints" / "last.ckpt")
    backbone = [k for k in after if not k.startswith("head.")]
    assert backbone and len(backbone) == len(after) - 2
    for k in backbone:  # parameters and BatchNorm statistics alike (frozen BN stays in eval mode)
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])
    assert summary2["best"] > 0.7  # chance is 0.2
    n_head = 16 * 4 * 5 + 5
    n_total = sum(v.numel() for k, v in after.items() if "running" not in k and "num_batches" not in k)
    assert f"({n_head} trainable, {n_total - n_head} frozen)" in caplog.text
    assert "pretrained: new head (not loaded): head.1.weight, head.1.bias" in caplog.text


# ------------------------------------------------------------------------------------------
# timm and torchvision backbones
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_timm_resnet18_from_imagenet_style_file_trains_on_digits(tmp_path, caplog):
    import timm
    from safetensors.torch import save_file

    # An ImageNet-shaped checkpoint (3 input channels, 1000 classes), as downloaded elsewhere.
    torch.manual_seed(1)
    imagenet = timm.create_model("resnet18", num_classes=1000)
    weights_file = tmp_path / "resnet18.safetensors"
    save_file(imagenet.state_dict(), str(weights_file))

    cfg = small_config(
        tmp_path, data={**_digits([0, 1, 2], size=16), "val_split": 0.5},
        model={"type": "timm:resnet18", "args": {"in_chans": 1}, "pretrained": str(weights_file)},
        optimizer={"type": "Adam", "args": {"lr": 1e-3}}, trainer={"epochs": 1, "monitor": "val/accuracy"},
        metrics=["accuracy"], logging={"every_n_steps": 1},
    )
    built = build_model(resolve(cfg), num_classes=3)  # the stem is the file's RGB filters, summed
    assert torch.allclose(built.conv1.weight, imagenet.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(built.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    with caplog.at_level(logging.INFO, logger="torchkiln"):
        run_dir, summary = _train(cfg)
    assert "adapted to the model's input channels: conv1.weight (64, 3, 7, 7) -> (64, 1, 7, 7)" in caplog.text
    assert "new head (not loaded): fc.weight, fc.bias" in caplog.text
    assert summary["final"]["train/accuracy"] > 0.5  # chance is 1/3
    steps = [json.loads(line)["train/loss_step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"train/loss_step"' in line]
    assert len(steps) == 9 and sum(steps[-3:]) / 3 < steps[0]
    after = _weights(run_dir / "checkpoints" / "last.ckpt")
    assert after["fc.weight"].shape == (3, 512) and after["conv1.weight"].shape == (64, 1, 7, 7)
    assert not torch.equal(after["layer4.1.conv2.weight"], imagenet.state_dict()["layer4.1.conv2.weight"])


def test_torchvision_backbone_head_swap_and_freeze(tmp_path):
    import torchvision

    torch.manual_seed(0)
    file = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), file)
    cfg = resolve(small_config(tmp_path, model={"type": "torchvision:resnet18", "args": {},
                                                "pretrained": str(file), "freeze": "backbone"}))
    check_components(cfg)
    model = build_model(cfg, num_classes=7)
    assert model.fc.out_features == 7 and find_head(model) == "fc"
    assert torch.equal(model.layer1[0].conv1.weight, torch.load(file)["layer1.0.conv1.weight"])
    freezer = build_freezer(cfg, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    model.train()
    assert not model.bn1.training and not model.layer4[1].bn2.training and model.training
    assert freezer.counts() == (512 * 7 + 7, sum(p.numel() for p in model.parameters()) - 512 * 7 - 7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_backbone_names_suggest_the_closest(tmp_path):
    for typ, hint in (("timm:resnet81", "resnet18"), ("torchvision:resnet05", "resnet50")):
        with pytest.raises(ConfigError, match=f"model.type: unknown .* '{typ.split(':')[1]}'; did you mean '{hint}'"):
            check_components(resolve(small_config(tmp_path, model={"type": typ, "args": {}})))


@register_model
class TinyNet(torch.nn.Module):
    """A project model registered with the decorator; its head is called `out`."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16))
        self.out = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        return self.out(self.body(x))


def test_register_model_and_import_path_with_named_head(tmp_path, monkeypatch):
    cfg = resolve(small_config(tmp_path, model={"type": "TinyNet", "args": {}, "freeze": "backbone"}))
    with pytest.raises(ConfigError, match="model.head: cannot tell which part of TinyNet is the head;"
                                          " name its module, e.g. model.head: out"):
        build_freezer(cfg, build_model(cfg, 3))
    (tmp_path / "mymodels.py").write_text("from test_models import TinyNet as Net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = resolve(small_config(tmp_path, model={"type": "mymodels:Net", "args": {}, "head": "out",
                                                "freeze": "backbone"}))
    model = build_model(cfg, 3)
    assert isinstance(model, TinyNet) and model.out.out_features == 3
    build_freezer(cfg, model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["out.weight", "out.bias"]


# ------------------------------------------------------------------------------------------
# loading weights: the report and the errors
# ------------------------------------------------------------------------------------------
def test_load_report_missing_unexpected_and_shape_mismatch(tmp_path, caplog):
    torch.manual_seed(0)
    source = SmallCNN(num_classes=10, width=8).state_dict()
    source.pop("features.0.weight")  # missing
    source["features.99.weight"] = torch.zeros(3)  # unexpected
    source["features.3.weight"] = torch.zeros(16, 4, 3, 3)  # wrong shape (model: 16, 8, 3, 3)
    path = tmp_path / "w.pth"
    torch.save(source, path)

    with pytest.raises(CheckpointError, match=r"shapes differ outside the head: features.3.weight file"
                                              r" \(16, 4, 3, 3\) vs model \(16, 8, 3, 3\); set model.strict: false"):
        load_pretrained(SmallCNN(num_classes=10, width=8), path, head="head")

    torch.save({k: v for k, v in source.items() if k != "features.3.weight"}, path)
    with pytest.raises(CheckpointError, match=r"2 model tensors are not in the file: features.0.weight,"
                                              r" features.3.weight; set model.strict: false"):
        load_pretrained(SmallCNN(num_classes=10, width=8), path, head="head")

    torch.save(source, path)
    model = SmallCNN(num_classes=4, width=8)
    with caplog.at_level(logging.INFO, logger="torchkiln"):
        report = load_pretrained(model, path, strict=False, head="head")
    assert report.missing == ["features.0.weight"]
    assert report.unexpected == ["features.99.weight"]
    assert report.mismatched == ["features.3.weight file (16, 4, 3, 3) vs model (16, 8, 3, 3)"]
    assert report.head_kept == ["head.1.weight", "head.1.bias"]  # num_classes 10 -> 4: expected, not an error
    assert torch.equal(model.features[1].running_mean, source["features.1.running_mean"])
    for line in ("missing from the file, left as initialised: features.0.weight",
                 "unexpected in the file, ignored: features.99.weight",
                 "shape mismatch, skipped (strict: false): features.3.weight",
                 "new head (not loaded): head.1.weight, head.1.bias"):
        assert line in caplog.text

    with pytest.raises(CheckpointError, match="none of its 2 tensors fit the model"):
        torch.save({"a.weight": torch.zeros(1), "b": torch.zeros(1)}, path)
        load_pretrained(model, path, strict=False, head="head")


def test_pretrained_formats_and_refusals(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = SmallCNN(num_classes=5, width=8)
    sd = src.state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "wrapped.pth")
    from torchkiln.engine.checkpoint import FORMAT, save_checkpoint

    save_checkpoint({"format": FORMAT, "model": sd}, tmp_path / "run.ckpt")
    for name in ("w.safetensors", "wrapped.pth", "run.ckpt"):
        model = SmallCNN(num_classes=5, width=8)
        report = load_pretrained(model, tmp_path / name, head="head")
        assert report.head_kept == [] and not report.missing, name
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items()), name

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_pretrained(SmallCNN(), tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="model.pretrained: .*nope.pth: file not found"):
        check_components(resolve(small_config(tmp_path, model={"type": "SmallCNN", "args": {},
                                                               "pretrained": str(tmp_path / "nope.pth")})))


# ------------------------------------------------------------------------------------------
# hub downloads fail fast with a clear message
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, key", [
    ({"type": "timm:resnet18", "args": {"pretrained": True}}, "model.args.pretrained"),
    ({"type": "torchvision:resnet50", "args": {"weights": "DEFAULT"}}, "model.args.weights"),
    ({"type": "SmallCNN", "args": {}, "pretrained": True}, "model.pretrained"),
])
def test_hub_download_requests_fail_fast(tmp_path, model, key):
    cfg = resolve(small_config(tmp_path, model=model))
    with pytest.raises(ConfigError, match=f"{key}: .*does not download weights.*set model.pretrained: /path/to"):
        check_components(cfg)
    if model["type"] != "SmallCNN":  # the factories refuse too (Python API, no config check)
        with pytest.raises(ConfigError, match="would download pretrained weights"):
            build_model(cfg, 10)


def test_hub_download_cli_exits_2_at_once(tmp_path):
    cfg = small_config(tmp_path, model={"type": "timm:resnet18", "args": {"pretrained": True, "in_chans": 1}})
    started = time.monotonic()
    proc = kiln("train", "-c", str(write_config(tmp_path, cfg)), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "model.args.pretrained: timm:resnet18 would download pretrained weights" in proc.stderr
    assert "set model.pretrained: /path/to/weights.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - started < 60
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------
# unfreeze_at_epoch, LR multipliers and resume
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_unfreeze_at_epoch_with_lr_mult_and_resume(tmp_path, caplog):
    torch.manual_seed(0)
    init = tmp_path / "init.pth"
    torch.save(SmallCNN(num_classes=10, width=8).state_dict(), init)
    cfg = small_config(
        tmp_path, model={"type": "SmallCNN", "args": {"width": 8}, "pretrained": str(init),
                         "freeze": "backbone", "unfreeze_at_epoch": 2},
        optimizer={"type": "SGD", "args": {"lr": 0.05, "momentum": 0.9},
                   "groups": [{"params": "features.*", "lr_mult": 0.1}]},
        trainer={"epochs": 2, "save_period": 1, "monitor": "val/accuracy"},
    )
    with caplog.at_level(logging.INFO, logger="torchkiln"):
        run_dir, _ = _train(cfg)
    ckpts = run_dir / "checkpoints"
    start, e1, e2 = torch.load(init), _weights(ckpts / "epoch-001.ckpt"), _weights(ckpts / "epoch-002.ckpt")
    backbone = [k for k in start if k.startswith("features.")]
    assert all(torch.equal(start[k], e1[k]) for k in backbone)  # frozen in epoch 1 (BN statistics too)
    assert not torch.equal(e1["head.1.weight"], start["head.1.weight"])
    moved = [k for k in backbone if not torch.equal(e1[k], e2[k])]
    assert set(moved) == set(backbone)  # epoch 2: every backbone tensor moves, BN statistics included
    assert "epoch 2: unfroze;" in caplog.text
    history = load_checkpoint(ckpts / "last.ckpt")["loop"]["history"]
    assert [h["lr/group0"] for h in history] == pytest.approx([0.005, 0.005])  # features.*: 0.1 x lr
    assert history[0]["lr/group1"] == pytest.approx(0.05)

    # Resuming from the end of epoch 1 gives bitwise the same weights as the run that never stopped.
    shutil.copy(ckpts / "epoch-002.ckpt", tmp_path / "uninterrupted.ckpt")
    resumed_cfg, ckpt, state = run.resume_config(str(ckpts / "epoch-001.ckpt"), None, [])
    run.train(resumed_cfg, resume=ckpt, state=state, progress=False)
    again, straight = _weights(ckpts / "last.ckpt"), _weights(tmp_path / "uninterrupted.ckpt")
    assert all(torch.equal(again[k], straight[k]) for k in straight)


def test_freeze_patterns_and_optimizer_keeps_every_parameter(tmp_path):
    cfg = resolve(small_config(tmp_path, model={"type": "SmallCNN", "args": {"width": 8},
                                                "freeze": ["features.0.*", "features.1.*"]}))
    model = build_model(cfg, 10)
    freezer = build_freezer(cfg, model)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["features.0.weight", "features.1.bias", "features.1.weight"]
    model.train()
    assert not model.features[1].training and model.features[4].training
    optimizer = build_optimizer(cfg, model)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert freezer.unfreeze_at_epoch is None and not freezer.set_epoch(5)
    with pytest.raises(ConfigError, match=r"model.freeze.0: pattern 'feature.*' matches no parameter"):
        build_freezer(resolve(small_config(tmp_path, model={"type": "SmallCNN", "args": {},
                                                                    "freeze": ["feature.*"]})),
                      build_model(cfg, 10))
    with pytest.raises(ConfigError, match="unfreeze_at_epoch needs model.freeze"):
        resolve(small_config(tmp_path, model={"type": "SmallCNN", "args": {}, "unfreeze_at_epoch": 2}))


# ------------------------------------------------------------------------------------------
# kiln summary
# ------------------------------------------------------------------------------------------
def test_kiln_summary(tmp_path):
    cfg = small_config(tmp_path, data={"batch_size": 16},
                       model={"type": "SmallCNN", "args": {"width": 8}, "freeze": "backbone"})
    proc = kiln("summary", "-c", str(write_config(tmp_path, cfg)), check=True)
    out = proc.stdout
    head = 32 * 10 + 10
    total = sum(p.numel() for p in SmallCNN(num_classes=10, width=8).parameters())
    assert "input (16, 1, 8, 8)" in out
    assert "[16, 10]" in out and "[16, 16, 4, 4]" in out  # output shapes, after the max-pool
    assert f"parameters: {total:,} total, {head:,} trainable, {total - head:,} frozen" in out
    assert "MACs:" in out and "M per batch of 16" in out and "estimated memory:" in out
    assert "Units." not in out
