"""GIFD: Generative Gradient Inversion via Feature Domain Optimization (Fang et al., ICCV 2023).

Spec 6.4 (``ffhibnese/GIFD_Gradient_Inversion_Attack``, ``inversefed/reconstruction_algorithms.py``).
A generator ``G = B_L o ... o B_1`` (one block per ConvTranspose stage) maps a latent ``z`` to
an image. The attack searches successive domains:

* stage 0: the latent ``z`` (Adam lr 0.1), projected back after every step onto the sphere of
  its initial norm (GIFD's spherical projection keeps ``||z||`` fixed per sample);
* stage l >= 1: the output ``h_l`` of block ``l`` computed from the previous stage's best point
  becomes a free variable; after every step its deviation from the stage's start ``h_l^0`` is
  projected onto the l1 ball ``||h_l - h_l^0||_1 <= r_l`` (:func:`project_l1_ball`, exact);
  the image ``B_L o ... o B_{l+1}(h_l)`` is clamped to the valid range.

Each stage uses Adam with GIFD's cosine ramp schedule (ramp-up 5 %, ramp-down over the last
75 %: :func:`ramp_lr`) and the loss ``GCosDist + 1e-4 TV(x) + 1e-6 ||x||_2 / (H W)``
(``sim_cmpr0`` with no top-k mask). ``restarts`` (4) independent latents run through all stages;
the output is the (restart, stage) with the lowest gradient-matching loss. The KLD term GIFD
applies to BigGAN's latent is not used (our latent prior is a plain Gaussian).

A generator is any ``nn.Module`` exposing ``latent_dim`` and ``blocks`` (an ``nn.ModuleList``
applied in order to ``z``); :class:`DCGAN` is the small one ``scripts/train_dcgan.py`` trains.
To plug in a pretrained BigGAN/StyleGAN2, wrap it in such a module (its synthesis blocks as
``blocks``; see docs/inversion.md) and give its radii.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attacks.inversion.common import Payload, cosine_distance, observe, payload_labels, total_variation


class DCGAN(nn.Module):
    """A small DCGAN generator for 28x28 grey images (Radford et al. 2016 layout).

    blocks: [z -> Linear -> BN -> ReLU -> (2c, 7, 7)], [ConvT(2c -> c, 4, s2, p1) -> BN -> ReLU
    -> (c, 14, 14)], [ConvT(c -> 1, 4, s2, p1) -> sigmoid -> (1, 28, 28)].
    """

    def __init__(self, latent_dim: int = 32, channels: int = 32) -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        c = int(channels)
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(latent_dim, 2 * c * 49), nn.Unflatten(1, (2 * c, 7, 7)), nn.BatchNorm2d(2 * c), nn.ReLU()),
                nn.Sequential(nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.BatchNorm2d(c), nn.ReLU()),
                nn.Sequential(nn.ConvTranspose2d(c, 1, 4, 2, 1), nn.Sigmoid()),
            ]
        )

    def forward(self, z: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Apply blocks ``start, start+1, ...`` (``start=0``: ``z`` is a latent)."""
        h = z
        for block in self.blocks[start:]:
            h = block(h)
        return h


class Discriminator(nn.Module):
    """DCGAN discriminator for 28x28 images (used only by the training script)."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        c = int(channels)
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * c * 49, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(-1)


def load_generator(path: str | Path) -> DCGAN:
    """A :class:`DCGAN` from ``scripts/train_dcgan.py``'s file (``weights_only`` load, eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gifd.generator: file not found: {path} (train one with scripts/train_dcgan.py)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    gen = DCGAN(int(blob["latent_dim"]), int(blob["channels"]))
    gen.load_state_dict(blob["state_dict"])
    gen.eval()
    for p in gen.parameters():
        p.requires_grad_(False)
    return gen


def project_l1_ball(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` ``[B, ...]`` onto ``{w : ||w||_1 <= radius}``.

    Duchi et al. (ICML 2008), Fig. 1: sort ``|v|`` descending, find the largest ``rho`` with
    ``u_rho > (sum_{j<=rho} u_j - r) / rho``, shrink by ``theta = (sum_{j<=rho} u_j - r) / rho``.
    Rows already inside the ball are returned unchanged.
    """
    if radius < 0:
        raise ValueError("l1 radius must be >= 0")
    flat = v.reshape(v.shape[0], -1)
    a = flat.abs()
    inside = a.sum(dim=1) <= radius
    if bool(inside.all()):
        return v
    if radius == 0:
        return torch.zeros_like(v)
    u, _ = torch.sort(a, dim=1, descending=True)
    css = torch.cumsum(u, dim=1)
    k = torch.arange(1, u.shape[1] + 1, device=v.device, dtype=v.dtype)
    cond = u - (css - radius) / k > 0  # true for j = 1 .. rho (a prefix)
    rho = cond.sum(dim=1, keepdim=True).clamp_min(1)  # count = last true index + 1
    theta = (css.gather(1, rho - 1) - radius) / rho.to(v.dtype)
    out = torch.sign(flat) * (a - theta).clamp_min(0.0)
    out = torch.where(inside[:, None], flat, out)
    return out.reshape(v.shape)


def ramp_lr(t: float, rampdown: float = 0.75, rampup: float = 0.05) -> float:
    """GIFD's (StyleGAN-projector's) schedule factor at progress ``t`` in [0, 1]."""
    factor = min(1.0, (1.0 - t) / rampdown)
    factor = 0.5 - 0.5 * math.cos(factor * math.pi)
    return factor * min(1.0, t / rampup)


@dataclass
class GIFD:
    """GIFD over a generator's latent and its intermediate feature domains (module docstring).

    ``steps``: iterations per stage (stage 0 = latent, then one per block output except the
    last block's, which is the image); ``radii``: l1 radius per feature stage, or ``None`` for
    ``radius_per_element`` times the feature's size.
    """

    generator: Any = None  # an nn.Module, or a path to scripts/train_dcgan.py's file
    steps: list[int] = field(default_factory=lambda: [500, 500, 500])
    radii: list[float] | None = None
    radius_per_element: float = 0.5
    lr: float = 0.1
    tv: float = 1e-4
    image_norm: float = 1e-6
    restarts: int = 4
    label_rule: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.generator is None:
            raise ValueError("gifd.generator: a generator module or a weights path is required")
        if isinstance(self.generator, (str, Path)):
            self.generator = load_generator(self.generator)
        n_stages = len(self.generator.blocks)  # latent + every block output but the image
        if len(self.steps) < 1 or len(self.steps) > n_stages:
            raise ValueError(f"gifd.steps: 1..{n_stages} stages for this generator (got {len(self.steps)})")
        if self.radii is not None and len(self.radii) < len(self.steps) - 1:
            raise ValueError("gifd.radii: one radius per feature stage (len(steps) - 1)")

    def loss(self, payload: Payload, x: torch.Tensor, labels: torch.Tensor, target: list[torch.Tensor]) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        rec = cosine_distance(observe(payload, x, labels), target)
        return rec + self.tv * total_variation(x) + self.image_norm * x.flatten(1).norm(dim=1).sum() / (h * w)

    def _stage(
        self, payload: Payload, labels: torch.Tensor, target: list[torch.Tensor], var: torch.Tensor, stage: int, steps: int
    ) -> tuple[torch.Tensor, float]:
        """Optimise ``var`` (latent for stage 0, block output otherwise); return its best value and loss."""
        gen, (lo, hi) = self.generator, payload.bounds
        start = var.detach().clone()
        var = start.clone().requires_grad_(True)
        z_norm = start.flatten(1).norm(dim=1).reshape(-1, *([1] * (start.dim() - 1)))
        if stage > 0:
            r = self.radii[stage - 1] if self.radii is not None else self.radius_per_element * start[0].numel()
        opt = torch.optim.Adam([var], lr=self.lr)
        best, best_loss = start.clone(), float("inf")
        for t in range(steps):
            for grp in opt.param_groups:
                grp["lr"] = self.lr * ramp_lr(t / steps)
            x = gen(var, start=stage).clamp(lo, hi)
            loss = self.loss(payload, x, labels, target)
            value = float(loss.detach())
            if value < best_loss:
                best_loss, best = value, var.detach().clone()
            (var.grad,) = torch.autograd.grad(loss, [var])
            opt.step()
            with torch.no_grad():
                if stage == 0:
                    var.mul_(z_norm / var.flatten(1).norm(dim=1).reshape(z_norm.shape).clamp_min(1e-12))
                else:
                    var.copy_(start + project_l1_ball(var - start, r))
        final = float(self.loss(payload, gen(var.detach(), start=stage).clamp(lo, hi), labels, target).detach())
        if final < best_loss:
            best_loss, best = final, var.detach().clone()
        return best, best_loss

    def reconstruct(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        gen = self.generator
        gen.eval()
        rng = torch.Generator().manual_seed(int(self.seed))
        labels = payload_labels(payload, self.label_rule)
        target = [g.detach() for g in payload.observed]
        lo, hi = payload.bounds
        best_img, best_loss, best_where, table = None, float("inf"), None, []
        for r in range(self.restarts):
            var = torch.randn((payload.num_images, gen.latent_dim), generator=rng)
            for stage, n in enumerate(self.steps):
                if stage > 0:  # the next domain starts at the block output of the best point so far
                    with torch.no_grad():
                        var = gen.blocks[stage - 1](var)
                var, loss = self._stage(payload, labels, target, var, stage, n)
                table.append({"restart": r, "stage": stage, "loss": loss})
                if loss < best_loss:
                    with torch.no_grad():
                        best_img = gen(var, start=stage).clamp(lo, hi)
                    best_loss, best_where = loss, (r, stage)
        assert best_img is not None
        return best_img.detach(), labels, {"loss": best_loss, "best": best_where, "stages": table}
