"""Built-in models, `timm:`/`torchvision:` backbones, local pretrained weights, freezing."""

from torchkiln.models.freeze import Freezer, make_freezer
from torchkiln.models.heads import find_head
from torchkiln.models.pretrained import LoadReport, load_pretrained, read_weights
from torchkiln.models.small import MLP, SmallCNN
from torchkiln.registry import MODELS

register_model = MODELS.register

__all__ = ["MLP", "Freezer", "LoadReport", "SmallCNN", "find_head", "load_pretrained", "make_freezer",
           "read_weights", "register_model"]
