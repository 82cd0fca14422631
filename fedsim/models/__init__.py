"""Model zoo. Every constructor takes ``in_shape`` and ``num_classes`` (filled in from the
dataset by the harness) plus its own options, so a config names only what it changes."""

from fedsim.models.zoo import CNN, MLP, LeNet5, ResNet18, build_model

__all__ = ["MLP", "LeNet5", "CNN", "ResNet18", "build_model"]
