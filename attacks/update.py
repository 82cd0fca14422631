"""Model-update attacks (client side): transforms of ``delta = local - global`` after training.

* :class:`SignFlip`: ``delta <- -s * delta`` (MUD-HoG's ``Attacker_Omniscient``, ``s`` =
  ``omniscient_scale``, default 1);
* :class:`GaussianNoise`: ``delta <- delta + N(mu, sigma^2)`` per element (MUD-HoG's
  ``Attacker_AddNoise_Grad``, ``sigma = std_add_noise = 0.01``);
* :class:`Scale`: ``delta <- s * delta`` (model replacement / boosting);
* :class:`NonFinite`: every entry becomes NaN or Inf, to check that no strategy averages it in.

As in the authors' code, sign flip and noise touch trainable parameters only
(``params_only=True`` leaves BatchNorm running statistics alone).
"""

from __future__ import annotations

import numpy as np
import torch

from attacks.base import ClientAttack, Update

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_buffer(name: str) -> bool:
    """True for state_dict entries that are BatchNorm buffers, not trainable parameters."""
    return name.endswith(BUFFER_SUFFIXES)


def _targets(delta: Update, params_only: bool) -> list[str]:
    return [k for k in delta if not (params_only and is_buffer(k))]


class SignFlip(ClientAttack):
    """Send ``-scale * delta`` (sign-flipping, an untargeted attack)."""

    def __init__(self, scale: float = 1.0, params_only: bool = True) -> None:
        self.scale, self.params_only = float(scale), bool(params_only)

    def transform_update(self, delta, rng):
        out = dict(delta)
        for k in _targets(delta, self.params_only):
            out[k] = -self.scale * delta[k]
        return out


class Scale(ClientAttack):
    """Send ``scale * delta`` (boosted update)."""

    def __init__(self, scale: float = 10.0, params_only: bool = True) -> None:
        self.scale, self.params_only = float(scale), bool(params_only)

    def transform_update(self, delta, rng):
        out = dict(delta)
        for k in _targets(delta, self.params_only):
            out[k] = self.scale * delta[k]
        return out


class GaussianNoise(ClientAttack):
    """Send ``delta + N(mean, std^2)`` per element (additive-noise, an untargeted attack)."""

    def __init__(self, std: float = 0.01, mean: float = 0.0, params_only: bool = True) -> None:
        if std < 0:
            raise ValueError("attack.std: must be >= 0")
        self.std, self.mean, self.params_only = float(std), float(mean), bool(params_only)

    def transform_update(self, delta, rng: np.random.Generator):
        out = dict(delta)
        for k in _targets(delta, self.params_only):
            v = delta[k]
            noise = self.mean + self.std * rng.standard_normal(tuple(v.shape))
            out[k] = v + torch.from_numpy(noise).to(v.dtype).to(v.device)
        return out


class NonFinite(ClientAttack):
    """Send an update full of NaN (``value='nan'``) or Inf (``value='inf'``)."""

    def __init__(self, value: str = "nan") -> None:
        if value not in ("nan", "inf"):
            raise ValueError("attack.value: must be 'nan' or 'inf'")
        self.value = float(value)

    def transform_update(self, delta, rng):
        return {k: torch.full_like(v, self.value) for k, v in delta.items()}
