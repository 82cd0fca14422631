"""Data attacks and unreliable clients (client side): transforms of what a client trains on.

* :class:`LabelFlip` / :class:`MultiLabelFlip`: targeted poisoning, labels in ``source`` become
  ``target`` (MUD-HoG, Gupta et al. ESORICS 2022, §5: 1 -> 7 and {1, 2, 3} -> 7);
* :class:`PartialTraining`: the client trains on a random fraction of its batches;
* :class:`DegradeBatches`: a random fraction of batches is blurred with a Gaussian kernel or
  gets pixel noise;
* :class:`Unreliable`: the two above chained with MUD-HoG's defaults (authors' code,
  ``clients_attackers.Unreliable_client``): each batch is used with probability 0.3, each used
  batch is blurred with probability 0.5 (kernel 7, sigma 30). Benign but low quality.

Every random choice draws from the ``rng`` the harness passes (keyed by seed, round, partition).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from attacks.base import Chain, ClientAttack
from fedsim.local import LocalRun, TrainHook


def flip_labels(y: torch.Tensor, source: Sequence[int], target: int) -> torch.Tensor:
    """``y`` with every label in ``source`` replaced by ``target``."""
    src = torch.as_tensor(list(source), dtype=y.dtype)
    return torch.where(torch.isin(y, src), torch.as_tensor(target, dtype=y.dtype), y)


class LabelFlip(ClientAttack):
    """Targeted label flipping: train with labels ``source -> target`` (paper: 1 -> 7)."""

    def __init__(self, source: int | Sequence[int] = 1, target: int = 7) -> None:
        self.source = [int(source)] if isinstance(source, (int, np.integer)) else [int(s) for s in source]
        self.target = int(target)
        if self.target in self.source:
            raise ValueError("attack.target: must not be one of the source labels")

    def transform_data(self, x, y, rng):
        return x, flip_labels(y, self.source, self.target)


class MultiLabelFlip(LabelFlip):
    """Multi-label flipping: several source classes to one target (paper: {1, 2, 3} -> 7)."""

    def __init__(self, source: Sequence[int] = (1, 2, 3), target: int = 7) -> None:
        super().__init__(list(source), target)


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian kernel ``[size, size]`` (sums to 1)."""
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * float(sigma) ** 2))
    k = torch.outer(g, g)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, kernel_size: int = 7, sigma: float = 30.0) -> torch.Tensor:
    """Depthwise Gaussian smoothing of images ``[B, C, H, W]`` with reflect padding.

    The authors pad by 2 whatever the kernel, which shrinks a 28x28 image under a 7x7 kernel;
    here the padding is ``(k - 1) // 2`` so the image keeps its size.
    """
    if x.dim() != 4:
        raise ValueError(f"gaussian_blur needs images [B, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    k = gaussian_kernel(kernel_size, sigma).to(x.dtype).to(x.device)
    weight = k.expand(c, 1, kernel_size, kernel_size).contiguous()
    lo, hi = (kernel_size - 1) // 2, kernel_size // 2
    padded = F.pad(x, (lo, hi, lo, hi), mode="reflect")
    return F.conv2d(padded, weight, groups=c)


def pixel_noise(x: torch.Tensor, max_std: float, mean: float, rng: np.random.Generator) -> torch.Tensor:
    """``x + N(mean, s^2)`` with a per-pixel ``s ~ U(0, max_std)`` (authors' ``add_noise`` mode)."""
    std = rng.random(tuple(x.shape)) * max_std
    noise = mean + rng.standard_normal(tuple(x.shape)) * std
    return x + torch.from_numpy(noise).to(x.dtype).to(x.device)


class _SkipBatches(TrainHook):
    def __init__(self, fraction: float, rng: np.random.Generator) -> None:
        self.fraction, self.rng = fraction, rng

    def on_batch(self, run: LocalRun, x, y):
        return (x, y) if self.rng.random() < self.fraction else None


class PartialTraining(ClientAttack):
    """Use each batch with probability ``fraction`` (skipped batches still count as steps)."""

    def __init__(self, fraction: float = 0.3) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError("attack.fraction: must be in [0, 1]")
        self.fraction = float(fraction)

    def hooks(self, rng):
        return [_SkipBatches(self.fraction, rng)]


class _DegradeHook(TrainHook):
    def __init__(self, owner: DegradeBatches, rng: np.random.Generator) -> None:
        self.owner, self.rng = owner, rng

    def on_batch(self, run: LocalRun, x, y):
        if self.rng.random() < self.owner.fraction:
            x = self.owner.degrade(x, self.rng)
        return x, y


class DegradeBatches(ClientAttack):
    """With probability ``fraction`` per batch, blur it (``method='blur'``) or add pixel noise
    (``method='noise'``)."""

    def __init__(
        self,
        fraction: float = 0.5,
        method: str = "blur",
        kernel_size: int = 7,
        sigma: float = 30.0,
        noise_max_std: float = 0.5,
        noise_mean: float = 0.0,
    ) -> None:
        if method not in ("blur", "noise"):
            raise ValueError("attack.method: must be 'blur' or 'noise'")
        if not 0 <= fraction <= 1:
            raise ValueError("attack.fraction: must be in [0, 1]")
        self.fraction, self.method = float(fraction), method
        self.kernel_size, self.sigma = int(kernel_size), float(sigma)
        self.noise_max_std, self.noise_mean = float(noise_max_std), float(noise_mean)

    def degrade(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.method == "blur":
            return gaussian_blur(x, self.kernel_size, self.sigma)
        return pixel_noise(x, self.noise_max_std, self.noise_mean, rng)

    def hooks(self, rng):
        return [_DegradeHook(self, rng)]


class Unreliable(Chain):
    """A benign but low-quality client: :class:`PartialTraining` then :class:`DegradeBatches`.

    Defaults are the MUD-HoG scripts' (``unreliable_fracTrain=0.3``, ``unreliable_fraction=0.5``,
    ``max_std_unreliable=30``; kernel 7, 5 for Fashion-MNIST).
    """

    def __init__(
        self,
        train_fraction: float = 0.3,
        degrade_fraction: float = 0.5,
        method: str = "blur",
        kernel_size: int = 7,
        sigma: float = 30.0,
        noise_max_std: float = 0.5,
    ) -> None:
        super().__init__(
            [
                PartialTraining(train_fraction),
                DegradeBatches(degrade_fraction, method, kernel_size, sigma, noise_max_std),
            ]
        )
