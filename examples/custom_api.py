"""A model and a Dataset of your own, trained through the Python API (README: "The Python API"),
with a callback of your own whose state goes into every checkpoint.

    python examples/custom_api.py --out runs/api

The data: points on two rings (a Dataset you write); the model: an MLP (an nn.Module
you write). Everything `kiln train` writes lands in the run directory.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.utils.data import Dataset

from torchkiln import Callback, make_trainer, run_loggers
from torchkiln.data.loaders import make_loader
from torchkiln.metrics import build_metrics


class Rings(Dataset):
    """(x, y) points on two rings around the origin; the class is the ring (radius 0.5 or 1)."""

    def __init__(self, n: int = 1000, noise: float = 0.1, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 2, (n,), generator=g)
        angle = torch.rand(n, generator=g) * 2 * math.pi
        radius = 0.5 + 0.5 * self.targets.float()
        self.points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
        self.points += noise * torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points[i], self.targets[i]


class Net(nn.Module):
    def __init__(self, hidden: int = 64, num_classes: int = 2):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class HalveLR(Callback):  # the README's callback: its state goes into every checkpoint
    def __init__(self, every=100):
        self.every, self.steps = every, 0

    def on_step_end(self, trainer, info):
        self.steps += 1
        if self.steps % self.every == 0:
            for group in trainer.optimizer.param_groups:
                group["lr"] *= 0.5

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def main(out: str, epochs: int) -> dict:
    torch.manual_seed(0)
    train_loader = make_loader(Rings(1000, seed=0), 64, train=True, seed=0)
    val_loader = make_loader(Rings(300, seed=1), 256, train=False, seed=0)
    test_loader = make_loader(Rings(300, seed=2), 256, train=False, seed=0)
    model = Net()
    # from here on, the README's snippet
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-2, total_steps=epochs * len(train_loader))
    trainer = make_trainer(model, optimizer, torch.nn.CrossEntropyLoss(),
                           metrics=build_metrics(["accuracy", "f1_macro"], num_classes=2),
                           scheduler=scheduler, epochs=epochs, grad_clip=1.0,
                           monitor="val/accuracy", run_dir=out, loggers=run_loggers(out, model),
                           callbacks=[HalveLR(every=1000)])
    summary = trainer.fit(train_loader, val_loader)
    metrics = trainer.validate(test_loader)
    outputs = trainer.predict(test_loader)
    print(f"best val/accuracy {summary['best']:.3f} at epoch {summary['best_epoch']};"
          f" test accuracy {float(metrics['val/accuracy']):.3f} on {len(outputs)} points; run directory {out}")
    return summary


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/api")
    p.add_argument("--epochs", type=int, default=10)
    a = p.parse_args()
    main(a.out, a.epochs)
