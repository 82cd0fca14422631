"""MLP, LeNet-5, a small CNN and a CIFAR-style ResNet-18."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

_ACTS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU}


def _act(name: str) -> nn.Module:
    if name not in _ACTS:
        raise ValueError(f"model.activation: '{name}' is not one of {sorted(_ACTS)}")
    return _ACTS[name]()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class MLP(nn.Module):
    """Fully connected network; images are flattened."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = _numel(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, int(h), bias=bias), _act(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, num_classes, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _flat_size(features: nn.Module, in_shape: Sequence[int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *in_shape)).numel())


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998): conv6-pool-conv16-pool-fc120-fc84-fc.

    ``activation='sigmoid'`` gives the smooth variant used in gradient-inversion work.
    Inputs smaller than 28x28 (the 8x8 digits) get padding on the second conv so the
    network still fits.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        activation: str = "relu",
        pool: str = "max",
    ) -> None:
        super().__init__()
        c, h = int(in_shape[0]), int(in_shape[1])
        pool_cls = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        pad2 = 0 if h // 2 >= 5 else 2
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), _act(activation), pool_cls(2),
            nn.Conv2d(6, 16, 5, padding=pad2), _act(activation), pool_cls(2),
            nn.Flatten(),
        )  # fmt: skip
        flat = _flat_size(self.features, in_shape)
        self.classifier = nn.Sequential(
            nn.Linear(flat, 120), _act(activation),
            nn.Linear(120, 84), _act(activation),
            nn.Linear(84, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN(nn.Module):
    """Small CNN for 28x28 and 32x32 images: conv32-pool-conv64-pool-fc128-fc."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = int(in_shape[0])
        for ch in channels:
            layers += [nn.Conv2d(c, int(ch), 3, padding=1), _act(activation), nn.MaxPool2d(2)]
            c = int(ch)
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        flat = _flat_size(self.features, in_shape)
        head: list[nn.Module] = [nn.Linear(flat, hidden), _act(activation)]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "group":
        return nn.GroupNorm(min(32, ch), ch)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"model.norm: '{kind}' is not one of batch, group, none")


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al. 2016; CIFAR stem: 3x3 conv, no max-pool).

    ``norm='group'`` swaps BatchNorm for GroupNorm, common in FL with non-IID data.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, norm: str = "batch", width: int = 64) -> None:
        super().__init__()
        c = int(in_shape[0])
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, 1, 1, bias=False), _norm(norm, width), nn.ReLU())
        layers, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stride = 1 if i == 0 else 2
            layers += [_Block(cin, cout, stride, norm), _Block(cout, cout, 1, norm)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def build_model(model_cfg: Any, in_shape: Sequence[int], num_classes: int, seed: int) -> nn.Module:
    """Instantiate ``model_cfg`` (a ``_target_`` node) with a seeded initialisation."""
    from hydra.utils import instantiate

    from fedsim.seeding import derive_seed

    state = torch.random.get_rng_state()
    torch.manual_seed(derive_seed(seed, "model-init"))
    try:
        return instantiate(model_cfg, in_shape=list(in_shape), num_classes=int(num_classes))
    finally:
        torch.random.set_rng_state(state)
