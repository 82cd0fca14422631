"""The attack protocol the harness drives.

An attack is a bundle of optional transforms, each testable alone:

* ``transform_data(x, y, rng) -> (x, y)``: data attacks (label flip, blur); applied to the
  client's partition before local training;
* ``hooks(rng) -> list[TrainHook]``: training-time attacks (PGD projection, per-batch blur);
* ``transform_update(delta, rng) -> delta``: model attacks on the update (sign flip, noise),
  applied after training, where ``delta = local - global`` per state_dict entry.

All three receive the same generator ``rng`` (keyed by seed, round and partition id), in that
order, and draw every random number from it, so an attack is reproducible on every engine.

Colluding attacks that need the benign updates are :class:`ReplyTransform` objects the harness
applies to the attackers' replies on the server side, before the strategy sees them (see
``docs/threat.md`` for that threat model).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedsim.local import TrainHook

Update = dict[str, torch.Tensor]


class ClientAttack:
    """Base class: every transform defaults to the identity."""

    def transform_data(
        self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def hooks(self, rng: np.random.Generator) -> list[TrainHook]:
        return []

    def transform_update(self, delta: Update, rng: np.random.Generator) -> Update:
        return delta

    def parts(self) -> list[ClientAttack]:
        """The elementary attacks this one is made of (itself; a :class:`Chain` its members)."""
        return [self]


class Chain(ClientAttack):
    """Apply several attacks in order (optax-style composition)."""

    def __init__(self, attacks: Sequence[ClientAttack]) -> None:
        self.attacks = list(attacks)

    def transform_data(self, x, y, rng):
        for a in self.attacks:
            x, y = a.transform_data(x, y, rng)
        return x, y

    def hooks(self, rng: np.random.Generator) -> list[TrainHook]:
        return [h for a in self.attacks for h in a.hooks(rng)]

    def transform_update(self, delta, rng):
        for a in self.attacks:
            delta = a.transform_update(delta, rng)
        return delta

    def parts(self) -> list[ClientAttack]:
        return [p for a in self.attacks for p in a.parts()]


class ReplyTransform:
    """A server-side transform of the attackers' updates given every reply of the round.

    ``apply(benign, malicious, rng) -> malicious``: lists of flattened updates (1-D float64
    tensors, ``local - global`` over every floating-point state_dict entry). ``benign`` holds the
    round's updates from clients that are not malicious (unreliable ones included), ``malicious``
    the honest updates this group's members computed; the result replaces the latter.
    """

    def apply(
        self, benign: list[torch.Tensor], malicious: list[torch.Tensor], rng: np.random.Generator
    ) -> list[torch.Tensor]:
        return malicious
