"""Models used by the gradient-inversion benchmarks.

* :class:`SigmoidLeNet`: DLG's LeNet (Zhu et al. 2019, ``mit-han-lab/dlg`` ``models/vision.py``):
  conv(C->12, k5, s2, p2) -> conv(12->12, k5, s2, p2) -> conv(12->12, k5, s1, p2) -> FC, sigmoid
  activations, weights and biases ~ U(-0.5, 0.5) (``weights_init``). On 28x28 MNIST the hidden
  width is 12*7*7 = 588 as in iDLG; on 8x8 digits it is 12*2*2 = 48.
* :class:`ReLULeNet5`: LeNet-5 with ReLU (IG's untrained-network setting); PyTorch default init.
* :class:`DropoutMLP`: the Dropout Inversion Attack's MLP (Scheliga et al. 2023, ``src/models``):
  3 hidden layers of 512, GELU, no bias, :class:`MaskDropout` after each hidden layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SigmoidLeNet(nn.Module):
    """DLG's sigmoid LeNet (see the module docstring)."""

    def __init__(self, in_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, init_range: float = 0.5):
        super().__init__()
        c = int(in_shape[0])
        self.body = nn.Sequential(
            nn.Conv2d(c, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(),
        )
        with torch.no_grad():
            hidden = int(self.body(torch.zeros(1, *in_shape)).numel())
        self.fc = nn.Linear(hidden, num_classes)
        if init_range > 0:
            for p in self.parameters():
                nn.init.uniform_(p, -init_range, init_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class ReLULeNet5(nn.Module):
    """LeNet-5 (conv6-pool-conv16-pool-fc120-fc84-fc) with ReLU and average pooling.

    Average pooling keeps the network differentiable almost everywhere in the input (max pooling
    routes the gradient through one pixel per window), as in IG's LeNet experiments.
    """

    def __init__(self, in_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10):
        super().__init__()
        c, h = int(in_shape[0]), int(in_shape[1])
        pad2 = 0 if h // 2 >= 5 else 2
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.AvgPool2d(2),
        )
        with torch.no_grad():
            flat = int(self.features(torch.zeros(1, *in_shape)).numel())
        self.head = nn.Sequential(
            nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class MaskDropout(nn.Module):
    """Dropout whose mask can be read and set (DIA, ``MaskDropout`` in the authors' code).

    * a mask is set (:meth:`set_mask`): ``forward(x) = x * mask / (1 - p)`` in any mode, so the
      attacker can supply (WIIG) or optimise (DIA) a continuous mask;
    * no mask, train mode: draw a Bernoulli(1 - p) mask, apply it and remember it in
      :attr:`last_mask` (the ground truth the harness may use for the well-informed bound);
    * no mask, eval mode: identity.
    """

    def __init__(self, p: float = 0.25) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1) (got {p})")
        self.p = float(p)
        self.mask: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return x
        if self.mask is not None:
            return x * self.mask / (1.0 - self.p)
        if not self.training:
            return x
        mask = torch.bernoulli(torch.full_like(x, 1.0 - self.p))
        self.last_mask = mask.detach()
        return x * mask / (1.0 - self.p)


class DropoutMLP(nn.Module):
    """DIA's MLP: flatten -> [Linear(no bias) -> GELU -> MaskDropout(p)] x depth -> Linear."""

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        width: int = 512,
        depth: int = 3,
        p: float = 0.25,
    ) -> None:
        super().__init__()
        n_in = 1
        for s in in_shape:
            n_in *= int(s)
        layers: list[nn.Module] = [nn.Flatten()]
        for _ in range(depth):
            layers += [nn.Linear(n_in, width, bias=False), nn.GELU(), MaskDropout(p)]
            n_in = width
        layers.append(nn.Linear(n_in, num_classes, bias=False))
        self.net = nn.Sequential(*layers)

    def dropouts(self) -> list[MaskDropout]:
        return [m for m in self.modules() if isinstance(m, MaskDropout)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODELS = {"sigmoid_lenet": SigmoidLeNet, "relu_lenet5": ReLULeNet5, "dropout_mlp": DropoutMLP}


def build(name: str, in_shape: Sequence[int], num_classes: int, seed: int, **kwargs) -> nn.Module:
    """A benchmark model by name, initialised from ``seed``."""
    if name not in MODELS:
        raise ValueError(f"inversion.model.name: '{name}' is not one of {sorted(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name](in_shape, num_classes, **kwargs)
