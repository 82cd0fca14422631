"""Multi-metrics (Huang et al., "Multi-metrics adaptively identifies backdoors in Federated
learning", ICCV 2023; authors' code siquanhuang/Multi-metrics, ``defense.py: Multi_metrics``).

For the round's client vectors g_1..g_n (paper Fig. 2 / Eq. 1-4):

    cos_i = sum_{j != i} (1 - cos(g_i, g_j))^2        (squared cosine distance)
    man_i = sum_{j != i} ||g_i - g_j||_1               (Manhattan)
    len_i = sum_{j != i} | ||g_i||_2 - ||g_j||_2 |     (norm difference)
    x_i = [cos_i, man_i, len_i],  Sigma = cov(x_1..x_n)   (np.cov of the n x 3 matrix)
    score_i = x_i^T Sigma^-1 x_i                       (un-centred x_i, no square root: the code;
                                                        the paper's sqrt does not change the order)

The ``int(p * n)`` clients with the smallest scores are kept (p = 0.3, hard-coded by the
authors) and their models averaged weighted by data size. ``Sigma`` is inverted with ``pinv``
(equal to the inverse when it is non-singular; the code's ``inv`` fails on a singular one).

Vectors: the trainable parameters only (``vectorize_net`` = ``net.parameters()``: no BatchNorm
buffers). ``use_weights=True`` (default, the authors' code) scores the full local weights
x + Delta_i; ``False`` scores the updates Delta_i (the paper's Fig. 2). The Manhattan feature is
the same either way. The kept clients' whole models (buffers included) are averaged.

Small rounds: at least one client is kept (the code's ``int(0.3 n)`` is 0 for n < 4 and would
average nothing); with fewer than 3 replies there is nothing to compare and all are kept.
"""

from __future__ import annotations

import numpy as np

from strategies.common import RoundUpdates, UpdateStrategy


def multimetric_features(vectors: np.ndarray) -> np.ndarray:
    """``[n, 3]`` features (squared cosine distance, Manhattan, norm difference), each summed
    over the other clients."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    cos = (v @ v.T) / np.outer(safe, safe)
    cos_d = (1.0 - cos) ** 2
    np.fill_diagonal(cos_d, 0.0)
    n = len(v)
    man = np.zeros(n)
    for i in range(n):  # row by row: an [n, n, d] difference tensor would not fit for real models
        man[i] = np.abs(v - v[i]).sum()
    length = np.abs(norms[:, None] - norms[None, :]).sum(1)
    return np.stack([cos_d.sum(1), man, length], axis=1)


def multimetric_scores(features: np.ndarray) -> np.ndarray:
    """``x_i^T Sigma^+ x_i`` with ``Sigma = np.cov(features.T)`` (un-centred x_i, as in the code)."""
    f = np.asarray(features, dtype=np.float64)
    cov = np.atleast_2d(np.cov(f.T))
    inv = np.linalg.pinv(cov)
    return np.einsum("ij,jk,ik->i", f, inv, f)


def multimetric_select(scores: np.ndarray, fraction: float = 0.3) -> np.ndarray:
    """Indices of the ``int(fraction * n)`` smallest scores (at least one), in ascending order."""
    s = np.asarray(scores, dtype=np.float64)
    k = max(1, int(fraction * len(s)))
    return np.sort(np.argsort(s, kind="stable")[:k])


class MultiMetrics(UpdateStrategy):
    """Multi-metrics aggregation (see the module docstring). ``flagged()`` labels the clients
    dropped in the last round ``backdoor``, so detection precision/recall is scored."""

    checkpoint_attrs = ("dropped",)  # fedsim.checkpoint: no memory across rounds

    def __init__(self, fraction: float = 0.3, use_weights: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 < fraction <= 1:
            raise ValueError("strategy.fraction: must be in (0, 1]")
        self.fraction, self.use_weights = float(fraction), bool(use_weights)
        self.last_kept: list[int] = []
        self.last_dropped: list[int] = []
        self.last_scores: dict[int, float] = {}

    def flagged(self) -> dict[int, str]:
        return {n: "backdoor" for n in self.last_dropped}

    def aggregate_updates(self, server_round: int, ru: RoundUpdates) -> np.ndarray | None:
        if not ru.node_ids:
            return None
        mask = self.param_mask()
        vecs = ru.updates[:, mask]
        if self.use_weights:
            vecs = vecs + self.global_vec[mask][None, :]
        if len(ru.node_ids) < 3:  # a 3x3 covariance needs clients to compare; keep everyone
            keep = np.arange(len(ru.node_ids))
            self.last_scores = {}
        else:
            scores = multimetric_scores(multimetric_features(vecs))
            keep = multimetric_select(scores, self.fraction)
            self.last_scores = dict(zip(ru.node_ids, scores.tolist()))
        kept = set(keep.tolist())
        self.last_kept = [ru.node_ids[i] for i in keep]
        self.last_dropped = [n for i, n in enumerate(ru.node_ids) if i not in kept]
        w = ru.num_examples[keep]
        return self.global_vec + (w[:, None] * ru.updates[keep]).sum(0) / w.sum()


__all__ = ["multimetric_features", "multimetric_scores", "multimetric_select", "MultiMetrics"]
