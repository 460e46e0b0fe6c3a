"""Models that place themselves: the rule for their devices, and a Trainer that moves nothing.

CPU only has one device type here, so the split is checked through the rule (a `meta` second
device stands in for cuda:1) and through a model that refuses to be moved; the real two-GPU model
is in benchmarks/fsdp_gpu_check.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkiln import make_trainer
from torchkiln.config.schema import TrainerConfig
from torchkiln.engine.device import SelfPlaced, model_devices, places_itself, self_placed_devices
from torchkiln.engine.fsdp import FSDPSettings, blocks_of
from torchkiln.engine.placement import Placement, move_optimizer_state
from torchkiln.errors import SettingError


class Split(nn.Module):
    """seq1 on one device, seq2 on another; forward moves the tensor between them."""

    def __init__(self, second: str):
        super().__init__()
        self.seq1 = nn.Linear(4, 8)
        self.seq2 = nn.Linear(8, 3, device=second)

    def forward(self, x):
        return self.seq2(self.seq1(x).to(self.seq2.weight.device))


class Unmovable(nn.Module):
    """A model that places itself on the CPU and fails if anyone moves it."""

    input_device = "cpu"

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.seen: list[torch.device] = []

    def forward(self, x):
        self.seen.append(x.device)
        return self.fc(x)

    def to(self, *args, **kwargs):
        raise AssertionError("the Trainer moved a model that places itself")


def test_parameters_on_two_devices_place_the_model_themselves():
    model = Split("meta")
    assert model_devices(model) == [torch.device("cpu"), torch.device("meta")]
    assert places_itself(model, "auto") and places_itself(model, "cpu")
    assert self_placed_devices(model) == (torch.device("cpu"), torch.device("meta"))  # inputs, loss
    assert not places_itself(nn.Linear(2, 2), "auto")
    assert places_itself(nn.Linear(2, 2), "model")  # asked for: left where it is, even on one device


def test_declared_devices_win_over_the_parameters():
    model = Split("meta")
    model.input_device, model.output_device = "meta", "cpu"
    assert self_placed_devices(model) == (torch.device("meta"), torch.device("cpu"))
    with pytest.raises(SettingError, match="no parameters"):
        self_placed_devices(nn.ReLU())


def test_placement_of_a_split_model_keeps_its_devices_and_moves_inputs():
    model = Split("meta")
    placement = Placement("auto").adopt(model)
    assert placement.self_placed and placement.input_device == torch.device("cpu")
    assert placement.device == torch.device("meta")  # loss and metrics follow the output
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    placement.setup(model, (), opt)
    assert model.seq1.weight.device.type == "cpu" and model.seq2.weight.device.type == "meta"
    assert isinstance(placement.train_model, SelfPlaced)
    assert placement.train_model(torch.ones(2, 4)).device.type == "meta"  # forward moved it to seq2's device
    seen = []
    wrapped = SelfPlaced(lambda x: seen.append(x.device), torch.device("meta"))
    wrapped(torch.ones(2, 4))
    assert seen == [torch.device("meta")]  # inputs go to the input device


def test_optimizer_state_follows_each_parameter_device():
    model = Split("meta")
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        opt.state[p] = {"exp_avg": torch.zeros(p.shape), "step": torch.tensor(1.0)}
    move_optimizer_state(opt)
    assert [s["exp_avg"].device.type for s in opt.state.values()] == ["cpu", "cpu", "meta", "meta"]


def test_trainer_moves_neither_a_self_placed_model_nor_its_parameters():
    torch.manual_seed(0)
    model = Unmovable()
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=8)
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                           device="model", epochs=1, progress=False)
    trainer.fit(data, data)
    assert trainer.loop.global_step == 2 and set(model.seen) == {torch.device("cpu")}
    with pytest.raises(SettingError, match="one process"):
        make_trainer(Unmovable(), torch.optim.SGD(model.parameters(), lr=0.1), device="model",
                     strategy="dp", progress=False).fit(data)


def test_fsdp_settings_blocks_and_precision_rules():
    class Block(nn.Sequential):
        pass

    model = nn.Sequential(Block(nn.Linear(2, 2), Block(nn.Linear(2, 2))), nn.Linear(2, 2))
    assert blocks_of(model, ["Block"]) == [model[0]]  # a block inside a listed block goes with its parent
    with pytest.raises(SettingError, match="no module of class Transformer"):
        blocks_of(model, ["Transformer"])
    with pytest.raises(SettingError, match="fp16"):
        FSDPSettings.from_dict({}, "fp16").check()
    assert FSDPSettings.from_dict({"wrap": ["Block"]}, "bf16").mixed_precision().param_dtype == torch.bfloat16
    assert TrainerConfig(strategy="fsdp", device="model").fsdp.reshard_after_forward is True


@pytest.mark.gpu
def test_a_model_split_over_cuda_and_cpu_trains_where_it_sits():
    model = Split("cpu")
    model.seq1.to("cuda:0")  # seq1 on the GPU, seq2 on the CPU: forward moves the tensor between them
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=8)
    trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                           epochs=1, progress=False)
    trainer.fit(data, data)
    assert trainer.placement.input_device.type == "cuda" and trainer.device.type == "cpu"
    assert model.seq1.weight.device.type == "cuda" and model.seq2.weight.device.type == "cpu"


@pytest.mark.parametrize("device", ["gpu0", "cuda:x"])
def test_a_device_string_torch_cannot_read_names_the_valid_forms(device):
    model = nn.Linear(4, 2)
    with pytest.raises(SettingError, match=rf"^device: '{device}' is not a device; use auto, cpu, cuda, cuda:N"):
        make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device=device)
    with pytest.raises(SettingError, match=r"^device:"):
        Placement(device)
