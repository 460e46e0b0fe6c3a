"""Small built-in models for small images and tabular vectors. Each has `features` and `head`."""

from __future__ import annotations

import torch
from torch import nn

from torchkiln.registry import MODELS


@MODELS.register
class SmallCNN(nn.Module):
    """Three conv blocks, global average pooling, a linear head. Any input size >= 4x4."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, dropout: float = 0.1):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width),
            *block(width, width * 2),
            nn.MaxPool2d(2),
            *block(width * 2, width * 4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register
class MLP(nn.Module):
    """Flattens its input; hidden layers with ReLU and dropout; a linear head."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: list[int] | None = None,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden if hidden is not None else [128]:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
