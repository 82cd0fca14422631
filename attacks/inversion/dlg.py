"""DLG (Zhu et al., NeurIPS 2019) and iDLG (Zhao et al., 2020).

DLG (spec 6.1; ``mit-han-lab/dlg`` ``main.py``) optimises a dummy image ``x ~ N(0, 1)`` and
dummy label logits ``y' ~ N(0, 1)`` jointly:

    min_{x, y'}  sum_layers || grad_theta L(f(x), softmax(y')) - grad_theta* ||^2

with soft-label cross-entropy, L-BFGS (lr 1, PyTorch's default 20 inner evaluations per step)
for 300 steps. iDLG (spec 6.2; ``PatrickZH/Improved-Deep-Leakage-from-Gradients`` ``iDLG.py``)
first reads the label off the last layer's weight gradient (:func:`common.idlg_label`), then
optimises ``x`` alone with the hard label; it stops once the loss is below 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attacks.inversion.common import Payload, l2_distance, observe, payload_labels, random_init


@dataclass
class DLG:
    """Deep Leakage from Gradients; ``labels='joint'`` is DLG, ``'infer'`` is iDLG.

    ``labels``: ``joint`` (soft labels optimised with the image, DLG), ``infer`` (iDLG's rule for
    one image, Yin et al.'s for batches, unless the payload shares labels), ``known`` (the
    payload must share labels). ``tol``: stop once the matching loss is below it (iDLG's 1e-6;
    DLG's code has no stop, ``tol=0``). ``max_eval`` is L-BFGS's ``max_iter`` per step.
    ``patience`` (not part of either recipe, off by default) ends runs whose loss has stalled,
    e.g. after the image saturated the sigmoids; it saves CPU on failures and changes nothing
    on runs that keep improving.
    """

    iterations: int = 300
    lr: float = 1.0
    labels: str = "joint"
    tol: float = 1e-6
    max_eval: int = 20
    init: str = "randn"
    patience: int = 0  # stop after this many steps without a new best loss (0 = never; not in the recipe)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.labels not in ("joint", "infer", "known"):
            raise ValueError(f"dlg.labels: '{self.labels}' is not one of joint, infer, known")
        if self.iterations < 1:
            raise ValueError("dlg.iterations: must be >= 1")

    def reconstruct(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Return ``(images [B, C, H, W], labels [B], stats)``."""
        gen = torch.Generator().manual_seed(int(self.seed))
        target = [g.detach() for g in payload.observed]
        x = random_init(payload, gen, self.init).requires_grad_(True)
        if self.labels == "joint":
            y_logits = torch.randn((payload.num_images, payload.num_classes), generator=gen).requires_grad_(True)
            variables = [x, y_logits]
        else:
            if self.labels == "known" and payload.labels is None:
                raise ValueError("dlg.labels='known' but the payload shares no labels")
            y_hard = payload_labels(payload)
            variables = [x]
        opt = torch.optim.LBFGS(variables, lr=self.lr, max_iter=self.max_eval)

        def labels_now() -> torch.Tensor:
            return torch.softmax(y_logits, dim=-1) if self.labels == "joint" else y_hard

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = l2_distance(observe(payload, x, labels_now()), target)
            loss.backward()
            return loss

        history: list[float] = []
        steps, best, since = 0, float("inf"), 0
        for _ in range(self.iterations):
            steps += 1
            opt.step(closure)
            loss = float(l2_distance(observe(payload, x.detach(), labels_now().detach(), create_graph=False), target))
            history.append(loss)
            if not torch.isfinite(torch.tensor(loss)) or loss < self.tol:
                break
            best, since = (loss, 0) if loss < best else (best, since + 1)
            if self.patience and since >= self.patience:
                break
        labels = y_logits.detach().argmax(-1) if self.labels == "joint" else y_hard
        return x.detach(), labels, {"loss": history[-1], "steps": steps, "history": history[::10]}


def idlg(**kwargs: Any) -> DLG:
    """iDLG: DLG with the label read off the gradient (``labels='infer'``) and the 1e-6 stop."""
    kwargs.setdefault("labels", "infer")
    return DLG(**kwargs)
