"""Client-side privacy defenses against gradient inversion, as composable update transforms.

Each transform maps what a client sends -- a gradient or a model update, as a dict (or list) of
tensors -- to what it sends instead (``update -> update``, optax style), and :func:`chain`
composes them. They are plain functions of tensors (unit-testable) and reach a federation as a
Flower mod (:class:`PrivacyMod`, listed in ``client.mods``), which applies them to the
difference between the trained and the received parameters of every train reply.

* :class:`ClipGlobalNorm`: scale the whole update to global l2 norm <= ``bound``;
* :class:`GaussianNoise`: clip to ``clip`` (default 4) then add N(0, std^2) per element (default
  std 0.1) -- the issue's "noise with global-norm clipping" (DP-SGD's shape; this is a fixed
  noise level, not a calibrated (epsilon, delta) guarantee: Flower's ``LocalDpMod`` gives one);
* :class:`Prune`: zero the smallest ``p`` % of each tensor by magnitude (gradient pruning /
  compression, Zhu et al. 2019 Sec. 5);
* the other defenses the issue names are settings, not transforms: dropout (a model with
  dropout, e.g. ``attacks.inversion.models.DropoutMLP`` or ``model.dropout``), larger local
  batches (``client.batch_size``), more local steps (``client.steps``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Update = dict[str, torch.Tensor]


def _as_dict(update: Update | Sequence[torch.Tensor]) -> tuple[Update, bool]:
    if isinstance(update, dict):
        return dict(update), True
    return {str(i): t for i, t in enumerate(update)}, False


def _back(d: Update, was_dict: bool) -> Update | list[torch.Tensor]:
    return d if was_dict else [d[str(i)] for i in range(len(d))]


def global_norm(update: Update) -> torch.Tensor:
    """l2 norm of all floating-point tensors together."""
    sq = [t.double().pow(2).sum() for t in update.values() if t.is_floating_point()]
    return torch.stack(sq).sum().sqrt() if sq else torch.zeros((), dtype=torch.float64)


class ClipGlobalNorm:
    """``u <- u * min(1, bound / ||u||_2)`` over all tensors together."""

    def __init__(self, bound: float = 4.0) -> None:
        if bound <= 0:
            raise ValueError(f"clip bound must be > 0 (got {bound})")
        self.bound = float(bound)

    def __call__(self, update, gen: torch.Generator | None = None):
        d, was = _as_dict(update)
        scale = min(1.0, self.bound / max(float(global_norm(d)), 1e-12))
        return _back({k: (v * scale if v.is_floating_point() else v) for k, v in d.items()}, was)


class GaussianNoise:
    """Clip to global norm ``clip`` (``None``: no clipping), then add N(0, ``std``^2) per element."""

    def __init__(self, std: float = 0.1, clip: float | None = 4.0) -> None:
        if std < 0:
            raise ValueError(f"noise std must be >= 0 (got {std})")
        self.std = float(std)
        self.clip = ClipGlobalNorm(clip) if clip is not None else None

    def __call__(self, update, gen: torch.Generator | None = None):
        d, was = _as_dict(update)
        if self.clip is not None:
            d = self.clip(d)
        out = {}
        for k, v in d.items():
            if v.is_floating_point() and self.std > 0:
                noise = torch.randn(v.shape, generator=gen, dtype=v.dtype) if gen is not None else torch.randn_like(v)
                v = v + self.std * noise.to(v.device)
            out[k] = v
        return _back(out, was)


class Prune:
    """Zero the ``p`` percent smallest-magnitude entries of each tensor (ties may zero a few more)."""

    def __init__(self, p: float = 90.0) -> None:
        if not 0 <= p <= 100:
            raise ValueError(f"prune p must be a percentage in [0, 100] (got {p})")
        self.p = float(p)

    def __call__(self, update, gen: torch.Generator | None = None):
        d, was = _as_dict(update)
        out = {}
        for k, v in d.items():
            n_zero = int(round(self.p / 100.0 * v.numel()))
            if v.is_floating_point() and n_zero > 0:
                if n_zero >= v.numel():
                    v = torch.zeros_like(v)
                else:
                    thresh = v.abs().flatten().kthvalue(n_zero).values
                    v = torch.where(v.abs() > thresh, v, torch.zeros_like(v))
            out[k] = v
        return _back(out, was)


class Chain:
    """Apply transforms in order (``chain(clip, noise)``)."""

    def __init__(self, *transforms: Callable[..., Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, update, gen: torch.Generator | None = None):
        for t in self.transforms:
            update = t(update, gen)
        return update


def chain(*transforms: Callable[..., Any]) -> Chain:
    return Chain(*transforms)


def build(nodes: Sequence[Any] | None) -> Chain:
    """A chain from config nodes (``_target_`` dicts or transform objects)."""
    from hydra.utils import instantiate

    items = []
    for i, node in enumerate(nodes or []):
        obj = instantiate(node) if isinstance(node, dict) or hasattr(node, "keys") else node
        if not callable(obj):
            raise ValueError(f"defense {i}: {node!r} is not a transform")
        items.append(obj)
    return Chain(*items)


class PrivacyMod:
    """A Flower client mod applying transforms to the update of every train reply.

    The update is ``trained - received`` for the floating-point arrays of the ``arrays`` record;
    the reply carries ``received + transform(update)``. Noise is seeded by (seed, round,
    partition-id) so runs repeat on every engine. Use in ``client.mods``::

        client:
          mods:
            - _target_: defenses.privacy.PrivacyMod
              transforms: [{_target_: defenses.privacy.GaussianNoise, std: 0.1, clip: 4.0}]
    """

    def __init__(self, transforms: Sequence[Any], seed: int = 0) -> None:
        self.chain = build(transforms)
        self.seed = int(seed)

    def __call__(self, msg, context, call_next):  # noqa: ANN001
        from flwr.app import MessageType

        from fedsim.arrays import record_from_torch, record_to_torch

        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        from fedsim.seeding import derive_seed

        sent = record_to_torch(msg.content.array_records["arrays"])
        got = record_to_torch(reply.content.array_records["arrays"])
        keys = [k for k, v in got.items() if v.is_floating_point()]
        delta = {k: got[k] - sent[k].to(got[k].dtype) for k in keys}
        rnd = int(msg.content.config_records.get("config", {}).get("server-round", 0) or 0)
        pid = int(context.node_config.get("partition-id", 0))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "privacy", rnd, pid))
        delta = self.chain(delta, gen)
        new = {k: (sent[k].to(v.dtype) + delta[k] if k in delta else v) for k, v in got.items()}
        reply.content.array_records["arrays"] = record_from_torch(new)
        return reply
