"""Dropout Inversion Attack (Scheliga, Maeder, Seeland, AAAI 2023) and its baselines.

Spec 6.5 (``dAI-SY-Group/DropoutInversionAttack``, ``src/attacks.py``, ``src/loss.py``). The
client computes its gradient in *train* mode, with an unknown dropout mask. The attacker runs
the model in eval mode with masks supplied explicitly (:class:`models.MaskDropout`):

* plain IG: no masks (the deterministic network) -- the gradient no longer matches;
* WIIG ("well-informed IG", upper bound): the client's true masks;
* DIA: one *continuous* mask per dropout layer (the activation's shape), initialised
  ~ Bernoulli(1 - p), optimised jointly with the image:

      L = GCosDist(g_rec, g) + lambda_TV TV(x) + lambda_m sum_l | (1 - mean(m_l)) - p |

  GCosDist = 1 - sum<g_rec, g> / (sqrt(sum ||g_rec||^2) sqrt(sum ||g||^2) + 1e-8);
  lambda_TV = 1e-5, lambda_m = 1e-4; Adam lr 0.1 over image and masks, the *sign* of the image
  gradient only; after each step masks are clamped to [0, 1] and the image to its box;
  ReduceLROnPlateau(factor 0.1, patience 800); early stop after ``stop_patience`` (4000)
  iterations without improvement or when the loss is below 1e-5; the best iterate is returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attacks.inversion.common import (
    Payload,
    cosine_distance,
    model_gradient,
    payload_labels,
    random_init,
    total_variation,
)
from attacks.inversion.models import MaskDropout


def dropout_layers(model: nn.Module) -> list[MaskDropout]:
    return [m for m in model.modules() if isinstance(m, MaskDropout)]


def activation_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Input shapes of every :class:`MaskDropout` for a batch like ``x`` (one eval forward)."""
    shapes: list[tuple[int, ...]] = []
    hooks = [m.register_forward_hook(lambda _m, inp, _o: shapes.append(tuple(inp[0].shape))) for m in dropout_layers(model)]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(x)
    model.train(was)
    for h in hooks:
        h.remove()
    return shapes


def mask_regulariser(masks: list[torch.Tensor], p: float) -> torch.Tensor:
    """``sum_l | (1 - mean(m_l)) - p |``: each mask's drop rate pulled towards ``p``."""
    return sum(((1.0 - m.mean()) - p).abs() for m in masks)


def set_masks(model: nn.Module, masks: list[torch.Tensor] | None) -> None:
    layers = dropout_layers(model)
    for i, layer in enumerate(layers):
        layer.set_mask(None if masks is None else masks[i])


@dataclass
class DropoutInversion:
    """DIA / WIIG / plain IG on a model with :class:`MaskDropout` layers.

    ``mode``: ``dia`` (masks optimised), ``wiig`` (true masks from ``payload.extra['masks']``,
    which only the harness can supply: an upper bound, not an attack), ``ig`` (no masks).
    """

    mode: str = "dia"
    iterations: int = 20000
    lr: float = 0.1
    tv: float = 1e-5
    mask_reg: float = 1e-4
    plateau_patience: int = 800
    stop_patience: int = 4000
    stop_loss: float = 1e-5
    signed: bool = True
    init: str = "randn"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("dia", "wiig", "ig"):
            raise ValueError(f"dia.mode: '{self.mode}' is not one of dia, wiig, ig")

    def reconstruct(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        if payload.gradient is None:
            raise ValueError("DropoutInversion attacks a FedSGD gradient (payload.gradient)")
        model = payload.model
        layers = dropout_layers(model)
        if not layers and self.mode != "ig":
            raise ValueError("the model has no MaskDropout layers (use attacks.inversion.models.DropoutMLP)")
        p = layers[0].p if layers else 0.0
        gen = torch.Generator().manual_seed(int(self.seed))
        labels = payload_labels(payload)
        target = [g.detach() for g in payload.observed]
        lo, hi = payload.bounds
        x = random_init(payload, gen, self.init).requires_grad_(True)
        masks: list[torch.Tensor] = []
        if self.mode == "dia":
            shapes = activation_shapes(model, x.detach())
            masks = [torch.bernoulli(torch.full(s, 1.0 - p), generator=gen).requires_grad_(True) for s in shapes]
        elif self.mode == "wiig":
            true_masks = payload.extra.get("masks")
            if true_masks is None:
                raise ValueError("wiig needs the client's true masks in payload.extra['masks']")
            masks = [m.detach().clone() for m in true_masks]
        model.eval()
        params = [x] + (masks if self.mode == "dia" else [])
        opt = torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999))
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=self.plateau_patience)
        best_loss, best_x, best_masks, since, steps = float("inf"), x.detach().clone(), None, 0, 0
        try:
            for _ in range(self.iterations):
                steps += 1
                opt.zero_grad()
                set_masks(model, masks if masks else None)
                g_rec = model_gradient(model, x, labels, create_graph=True)
                loss = cosine_distance(g_rec, target, eps=1e-8) + self.tv * total_variation(x)
                if self.mode == "dia":
                    loss = loss + self.mask_reg * mask_regulariser(masks, p)
                grads = torch.autograd.grad(loss, params)
                value = float(loss.detach())
                if value < best_loss:  # the iterate this loss belongs to (before the step)
                    best_loss, since = value, 0
                    best_x = x.detach().clone()
                    best_masks = [m.detach().clone() for m in masks]
                else:
                    since += 1
                x.grad = grads[0].sign() if self.signed else grads[0]
                for m, g in zip(params[1:], grads[1:]):
                    m.grad = g
                opt.step()
                with torch.no_grad():
                    x.clamp_(lo, hi)
                    for m in masks:
                        m.clamp_(0.0, 1.0)
                plateau.step(value)
                if since >= self.stop_patience or value < self.stop_loss or not torch.isfinite(loss):
                    break
        finally:
            set_masks(model, None)
        stats: dict[str, Any] = {"loss": best_loss, "steps": steps}
        if best_masks:
            stats["masks"] = best_masks
        return best_x, labels, stats
