"""Order-independent randomness.

Every random choice in fedsim (node sampling, participation, partitioning, attacker assignment,
each client's batches) draws from a generator keyed by ``(seed, purpose, round, partition-id)``
and never from global or order-dependent state. This is what lets the inline, Ray and Flower
engines produce the same result: whichever worker serves a client, in whatever order, it draws
the same numbers.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``keys`` (stable across processes)."""
    text = "/".join([str(int(seed))] + [str(k) for k in keys])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def np_rng(seed: int, *keys: object) -> np.random.Generator:
    """A NumPy generator keyed by ``(seed, *keys)``."""
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_gen(seed: int, *keys: object) -> torch.Generator:
    """A CPU torch generator keyed by ``(seed, *keys)``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *keys))
    return g
