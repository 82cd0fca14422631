"""Norm clipping and weak differential privacy (Sun et al., "Can you really backdoor federated
learning?", 2019), the baselines of the edge-case and Multi-metrics papers.

* :class:`NormClipping`: each update is clipped to ``||Delta_i|| <= norm_bound`` (over the
  trainable parameters), then FedAvg (weighted by data size);
* :class:`WeakDP`: the same, then Gaussian noise ``N(0, noise_std^2)`` is added to every
  trainable parameter of the aggregate. The authors' values: ``norm_bound = 2``,
  ``noise_std = 0.0025``.

BatchNorm buffers are averaged unclipped and get no noise.
"""

from __future__ import annotations

import numpy as np

from fedsim.seeding import np_rng
from strategies.common import RoundUpdates, UpdateStrategy, weighted_mean


def clip_updates(updates: np.ndarray, mask: np.ndarray, bound: float) -> np.ndarray:
    """Rows scaled so the norm over ``mask`` positions is at most ``bound`` (buffers untouched)."""
    out = np.array(updates, dtype=np.float64, copy=True)
    norms = np.linalg.norm(out[:, mask], axis=1)
    scale = np.minimum(1.0, bound / np.where(norms > 0, norms, np.inf))
    out[:, mask] *= scale[:, None]
    return out


class NormClipping(UpdateStrategy):
    """FedAvg of the norm-clipped updates (``norm_bound``, authors: 2)."""

    checkpoint_attrs = ("dropped",)  # fedsim.checkpoint: no memory across rounds (noise seeded by round)

    def __init__(self, norm_bound: float = 2.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if norm_bound <= 0:
            raise ValueError("strategy.norm_bound: must be > 0")
        self.norm_bound = float(norm_bound)

    def aggregate_updates(self, server_round: int, ru: RoundUpdates) -> np.ndarray | None:
        if not ru.node_ids:
            return None
        clipped = clip_updates(ru.updates, self.param_mask(), self.norm_bound)
        return self.global_vec + weighted_mean(clipped, ru.num_examples)


class WeakDP(NormClipping):
    """Norm clipping, then ``N(0, noise_std^2)`` on the aggregate (authors: 2, 0.0025)."""

    def __init__(self, norm_bound: float = 2.0, noise_std: float = 0.0025, seed: int = 0, **kwargs) -> None:
        super().__init__(norm_bound=norm_bound, **kwargs)
        if noise_std < 0:
            raise ValueError("strategy.noise_std: must be >= 0")
        self.noise_std, self.seed = float(noise_std), int(seed)

    def aggregate_updates(self, server_round: int, ru: RoundUpdates) -> np.ndarray | None:
        new = super().aggregate_updates(server_round, ru)
        if new is None or self.noise_std == 0:
            return new
        mask = self.param_mask()
        rng = np_rng(self.seed, "weakdp-noise", server_round)
        new[mask] += rng.normal(0.0, self.noise_std, size=int(mask.sum()))
        return new


__all__ = ["clip_updates", "NormClipping", "WeakDP"]
