"""What every gradient-inversion attack shares: the payload, the client's side of the protocol,
gradient distances, the TV prior and label inference.

Threat model (issue 10, spec section 6.8): the attacker is an honest-but-curious server. It sees
exactly what a client sends -- a gradient (FedSGD) or an update after local SGD steps (FedAvg) --
the model and, where the protocol shares them, the labels. It never sees the client's images; the
harness alone scores reconstructions. :class:`Payload` is that view (breaching's
``(payloads, shared_data)`` split folded into one object).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

Grads = list[torch.Tensor]


@dataclass
class Payload:
    """What the server sees of one client reply, plus the public protocol facts.

    ``gradient`` (FedSGD) or ``update`` (FedAvg: local minus global parameters after
    ``local_steps`` SGD steps of ``local_batch`` images at ``local_lr``) is set, not both.
    ``labels`` is set only when the protocol shares them. ``bounds`` is the valid pixel range.
    """

    model: nn.Module
    shape: tuple[int, ...]  # one image, (C, H, W)
    num_classes: int
    num_images: int
    gradient: Grads | None = None
    update: Grads | None = None
    local_lr: float = 0.0
    local_steps: int = 1
    local_batch: int = 0  # 0 = the whole batch every step
    labels: torch.Tensor | None = None
    bounds: tuple[float, float] = (0.0, 1.0)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def observed(self) -> Grads:
        obs = self.gradient if self.gradient is not None else self.update
        if obs is None:
            raise ValueError("payload carries neither a gradient nor an update")
        return obs


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with a probability (or one-hot) target, averaged over the batch (DLG)."""
    return torch.mean(torch.sum(-target * torch.log_softmax(logits, dim=-1), dim=-1))


def _loss(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = functional_call(model, params, (x,))
    if y.is_floating_point():  # soft labels
        return soft_cross_entropy(out, y)
    return nn.functional.cross_entropy(out, y)


def model_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> Grads:
    """``grad_theta L(f(x), y)`` for every trainable parameter (mean CE over the batch).

    ``y`` holds class indices, or probabilities for DLG's soft labels. With ``create_graph`` the
    result is differentiable in ``x`` (and ``y``), which every optimisation attack needs.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    loss = soft_cross_entropy(out, y) if y.is_floating_point() else nn.functional.cross_entropy(out, y)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return list(grads) if create_graph else [g.detach() for g in grads]


def local_update(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    steps: int,
    batch_size: int = 0,
    create_graph: bool = False,
) -> Grads:
    """FedAvg client update ``theta_K - theta_0`` after ``steps`` plain SGD steps.

    Mini-batches are taken in order (``x[0:b], x[b:2b], ...``, wrapping round), as in IG's
    ``FedAvgReconstructor`` (``loss_steps`` over ``local_batch`` slices). With ``create_graph``
    the steps are unrolled differentiably (IG's FedAvg attack differentiates through them).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach() for n, p in params.items()}
    cur = dict(params)
    n = x.shape[0]
    b = n if batch_size <= 0 else min(batch_size, n)
    pos = 0
    for _ in range(int(steps)):
        if pos >= n:
            pos = 0
        xb, yb = x[pos : pos + b], y[pos : pos + b]
        pos += b
        loss = _loss(model, cur, xb, yb)
        grads = torch.autograd.grad(loss, [cur[k] for k in names], create_graph=create_graph)
        cur = {k: cur[k] - lr * g for k, g in zip(names, grads)}
        if not create_graph:
            cur = {k: v.detach().requires_grad_(True) for k, v in cur.items()}
    out = [cur[k] - start[k] for k in names]
    return out if create_graph else [d.detach() for d in out]


def observe(payload: Payload, x: torch.Tensor, y: torch.Tensor, create_graph: bool = True) -> Grads:
    """What the client would have sent for candidate data ``(x, y)``: gradient or update."""
    if payload.gradient is not None:
        return model_gradient(payload.model, x, y, create_graph=create_graph)
    return local_update(
        payload.model, x, y, payload.local_lr, payload.local_steps, payload.local_batch, create_graph=create_graph
    )


def l2_distance(g_rec: Grads, g: Grads) -> torch.Tensor:
    """DLG's objective: ``sum over layers of ||g_rec - g||^2``."""
    return sum(((a - b) ** 2).sum() for a, b in zip(g_rec, g))


def cosine_distance(g_rec: Grads, g: Grads, eps: float = 0.0) -> torch.Tensor:
    """IG's objective (Geiping et al. 2020, Eq. 4; ``cost_fn='sim'``), over all layers jointly:

    ``1 - <g_rec, g> / (||g_rec|| ||g|| + eps)`` with the inner product and norms taken over
    the concatenation of every layer. (IG's code uses ``eps = 0``; DIA's GCosDist ``1e-8``.)
    """
    dot = sum((a * b).sum() for a, b in zip(g_rec, g))
    na = sum((a * a).sum() for a in g_rec).sqrt()
    nb = sum((b * b).sum() for b in g).sqrt()
    return 1.0 - dot / (na * nb + eps)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV with means (IG's ``TV``): ``mean|dx| + mean|dy|`` over the last two axes."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def last_weight_gradient(payload: Payload) -> torch.Tensor:
    """The observed gradient (or update) of the last layer's weight matrix ``[classes, hidden]``."""
    for g in reversed(payload.observed):
        if g.dim() == 2 and g.shape[0] == payload.num_classes:
            return g
    raise ValueError("no [num_classes, hidden] weight gradient in the payload (last layer must be Linear)")


def idlg_label(grad_w: torch.Tensor) -> int:
    """iDLG (Zhao et al. 2020): ``argmin_c sum_j dL/dW[c, j]``.

    With one example, non-negative inputs ``h`` to the last layer and CE on a one-hot target,
    ``dL/dW[c] = (p_c - 1[c = y]) h``: only the true row is non-positive. (A FedAvg update is
    ``-lr * sum of gradients``; :func:`infer_labels` flips its sign first.)
    """
    return int(torch.argmin(grad_w.sum(dim=-1)).item())


def infer_labels(grad_w: torch.Tensor, num_images: int, rule: str = "auto", is_update: bool = False) -> torch.Tensor:
    """Labels from the last layer's weight gradient.

    * ``idlg``: batch of one only (the iDLG rule above);
    * ``yin``: Yin et al. 2021 (GradInversion, Eq. 8): the ``B`` rows with the most negative
      *minimum* entry, ``argsort_c(min_j dL/dW[c, j])[:B]``. Valid when the batch's labels are
      distinct, which is that rule's assumption;
    * ``auto``: ``idlg`` for one image, ``yin`` otherwise.
    """
    g = -grad_w if is_update else grad_w
    if rule == "auto":
        rule = "idlg" if num_images == 1 else "yin"
    if rule == "idlg":
        if num_images != 1:
            raise ValueError("label rule 'idlg' is valid for one image only; use 'yin' for batches")
        return torch.tensor([idlg_label(g)])
    if rule == "yin":
        return torch.argsort(g.min(dim=-1).values)[:num_images].sort().values
    raise ValueError(f"label rule '{rule}' is not one of auto, idlg, yin")


def payload_labels(payload: Payload, rule: str = "auto") -> torch.Tensor:
    """The shared labels if the protocol gives them, else inferred from the last layer."""
    if payload.labels is not None:
        return payload.labels.clone()
    return infer_labels(last_weight_gradient(payload), payload.num_images, rule, payload.update is not None)


def random_init(payload: Payload, gen: torch.Generator, kind: str = "randn") -> torch.Tensor:
    """A dummy batch ``[B, C, H, W]``: ``randn`` (DLG, iDLG, IG) or ``rand`` (uniform in bounds)."""
    shape = (payload.num_images, *payload.shape)
    if kind == "randn":
        return torch.randn(shape, generator=gen)
    if kind == "rand":
        lo, hi = payload.bounds
        return lo + (hi - lo) * torch.rand(shape, generator=gen)
    raise ValueError(f"init '{kind}' is not one of randn, rand")
