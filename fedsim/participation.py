"""Participation models: who trains in a round, decided by the harness, not the strategy.

A model answers ``active(round) -> sorted partition ids``. Every draw comes from generators
keyed by (seed, "participation", ...), so the answer depends only on the config, never on the
engine or on execution order. Models are registered by name in :data:`PARTICIPATION`;
``participation.name`` selects one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from fedsim.seeding import np_rng


class Participation(ABC):
    """Base class. Subclasses implement :meth:`active`."""

    def __init__(self, cfg: Any, num_clients: int, seed: int, context: dict[str, Any] | None = None) -> None:
        self.cfg, self.n, self.seed = cfg, num_clients, seed
        self.context = context or {}

    @abstractmethod
    def active(self, server_round: int) -> list[int]:
        """Sorted partition ids that train in ``server_round``."""

    def probabilities(self) -> np.ndarray | None:
        """Per-client participation probabilities p_n, where the model has them."""
        return None


PARTICIPATION: dict[str, type[Participation]] = {}


def register_participation(name: str) -> Callable[[type[Participation]], type[Participation]]:
    def deco(cls: type[Participation]) -> type[Participation]:
        PARTICIPATION[name] = cls
        return cls

    return deco


@register_participation("full")
class Full(Participation):
    """Every client, every round."""

    def active(self, server_round: int) -> list[int]:
        return list(range(self.n))


@register_participation("sampled")
class Sampled(Participation):
    """A uniformly sampled fraction of clients per round (at least ``min_clients``),
    drawn from a generator keyed by (seed, round): Flower's usual sampling, but seeded."""

    def active(self, server_round: int) -> list[int]:
        k = max(int(self.cfg.fraction * self.n), int(self.cfg.min_clients))
        k = min(k, self.n)
        if k == self.n:
            return list(range(self.n))
        rng = np_rng(self.seed, "participation", "sampled", server_round)
        return sorted(rng.choice(self.n, size=k, replace=False).tolist())


def validate(cfg: Any, num_clients: int) -> None:
    """Check the participation config; raise ConfigError naming the key."""
    from fedsim.config import ConfigError

    if cfg.name not in PARTICIPATION:
        raise ConfigError(f"participation.name: '{cfg.name}' is not one of {sorted(PARTICIPATION)}")
    if not 0 < cfg.fraction <= 1:
        raise ConfigError(f"participation.fraction: must be in (0, 1] (got {cfg.fraction})")
    if cfg.min_clients < 0:
        raise ConfigError("participation.min_clients: must be >= 0")


def build(cfg: Any, num_clients: int, seed: int, context: dict[str, Any] | None = None) -> Participation:
    """Instantiate the participation model ``cfg.name``."""
    return PARTICIPATION[cfg.name](cfg, num_clients, seed, context)
