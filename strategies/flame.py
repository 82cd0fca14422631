"""FLAME (Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022,
Alg. 1): cluster, clip, noise.

1. ``c_ij = 1 - cos(W_i, W_j)`` over the local models; HDBSCAN on the precomputed distances
   (scikit-learn's ``HDBSCAN``, ``min_cluster_size = n // 2 + 1``, ``min_samples = 1``,
   ``allow_single_cluster=True``); the clients of the largest cluster are admitted, the rest
   flagged. (If HDBSCAN calls every client noise, all are admitted.)
2. ``e_i = ||W_i - G||`` for every client, ``S_t = median(e)``; each admitted model is clipped:
   ``G + (W_i - G) * min(1, S_t / e_i)``.
3. ``G' = mean of the clipped admitted models`` (unweighted, as Alg. 1) ``+ N(0, (lambda S_t)^2)``
   on the trainable parameters, ``lambda = 0.001`` (the paper's value for image classification).

``cluster_on='weights'`` (default, the paper) or ``'updates'`` (cosine of ``W_i - G``). BatchNorm
buffers are averaged but neither clustered on nor noised.
"""

from __future__ import annotations

import numpy as np

from fedsim.seeding import np_rng
from strategies.common import RoundUpdates, UpdateStrategy


def cosine_distances(vectors: np.ndarray) -> np.ndarray:
    """``1 - cos(v_i, v_j)``, symmetric, zero diagonal, clipped at 0."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1)
    unit = v / np.where(norms > 0, norms, 1.0)[:, None]
    d = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return d


def flame_admitted(distances: np.ndarray) -> np.ndarray:
    """Indices of the clients in HDBSCAN's largest cluster (all, if there is no cluster)."""
    from sklearn.cluster import HDBSCAN

    n = len(distances)
    if n < 3:
        return np.arange(n)
    labels = HDBSCAN(
        min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed", allow_single_cluster=True, copy=True
    ).fit_predict(distances)
    clusters = [c for c in np.unique(labels) if c >= 0]
    if not clusters:
        return np.arange(n)
    biggest = max(clusters, key=lambda c: (int((labels == c).sum()), -int(c)))
    return np.flatnonzero(labels == biggest)


def median_clip(updates: np.ndarray, norms: np.ndarray, bound: float) -> np.ndarray:
    """``Delta_i * min(1, bound / ||Delta_i||)`` row-wise."""
    scale = np.minimum(1.0, bound / np.where(norms > 0, norms, np.inf))
    return updates * scale[:, None]


class Flame(UpdateStrategy):
    """FLAME aggregation (see the module docstring); ``flagged()`` labels the clients outside
    the admitted cluster ``backdoor``."""

    checkpoint_attrs = ("dropped",)  # fedsim.checkpoint: no memory across rounds (noise seeded by round)

    def __init__(self, noise_lambda: float = 0.001, cluster_on: str = "weights", seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if noise_lambda < 0:
            raise ValueError("strategy.noise_lambda: must be >= 0")
        if cluster_on not in ("weights", "updates"):
            raise ValueError("strategy.cluster_on: must be 'weights' or 'updates'")
        self.noise_lambda, self.cluster_on, self.seed = float(noise_lambda), cluster_on, int(seed)
        self.last_dropped: list[int] = []

    def flagged(self) -> dict[int, str]:
        return {n: "backdoor" for n in self.last_dropped}

    def aggregate_updates(self, server_round: int, ru: RoundUpdates) -> np.ndarray | None:
        if not ru.node_ids:
            return None
        mask = self.param_mask()
        upd = ru.updates[:, mask]
        vecs = upd + self.global_vec[mask][None, :] if self.cluster_on == "weights" else upd
        admitted = flame_admitted(cosine_distances(vecs))
        keep = set(admitted.tolist())
        self.last_dropped = [n for i, n in enumerate(ru.node_ids) if i not in keep]
        norms = np.linalg.norm(upd, axis=1)
        bound = float(np.median(norms))
        clipped = median_clip(ru.updates[admitted], norms[admitted], bound)
        new = self.global_vec + clipped.mean(0)
        sigma = self.noise_lambda * bound
        if sigma > 0:
            rng = np_rng(self.seed, "flame-noise", server_round)
            new[mask] += rng.normal(0.0, sigma, size=int(mask.sum()))
        return new


__all__ = ["cosine_distances", "flame_admitted", "median_clip", "Flame"]
