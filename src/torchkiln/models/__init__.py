"""Built-in models; `register_model` for project code."""

from torchkiln.models.small import MLP, SmallCNN
from torchkiln.registry import MODELS

register_model = MODELS.register

__all__ = ["MLP", "SmallCNN", "register_model"]
