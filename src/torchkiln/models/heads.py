"""Where a model's classifier head is: the part replaced for a new `num_classes` and never frozen."""

from __future__ import annotations

from torch import nn

from torchkiln.errors import ConfigError, did_you_mean

# Attribute names of heads, in the order they are tried: ours and timm's ViTs (`head`),
# torchvision's ResNets (`fc`), its VGG/DenseNet/MobileNet/EfficientNet (`classifier`), its ViT (`heads`).
HEAD_NAMES = ("head", "fc", "classifier", "heads")


def find_head(model: nn.Module, name: str | None = None, where: str = "model.head",
              required: bool = True) -> str | None:
    """The module name of the head: `name` if given, timm's `get_classifier()`, or a usual attribute.

    Without one, a ConfigError when `required`, else None.
    """
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules or name == "":
            raise ConfigError(f"{where}: '{name}' is not a module of {type(model).__name__}"
                              f"{did_you_mean(name, [n for n in modules if n])}")
        return name
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Module):
            for n, m in modules.items():
                if m is head and n:
                    return n
    for n in HEAD_NAMES:
        if isinstance(getattr(model, n, None), nn.Module):
            return n
    if not required:
        return None
    children = [n for n, _ in model.named_children()]
    raise ConfigError(f"{where}: cannot tell which part of {type(model).__name__} is the head;"
                      f" name its module, e.g. model.head: {children[-1] if children else 'fc'}")


def in_head(key: str, head: str | None) -> bool:
    return head is not None and (key == head or key.startswith(head + "."))
