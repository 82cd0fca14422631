"""Robust aggregation baselines MUD-HoG compares against (besides Flower's Krum, MultiKrum,
FedMedian, FedTrimmedAvg and Bulyan): the geometric median (RFA) and FoolsGold.

Both aggregate the round's updates ``Delta_i = x_i - x`` (:class:`UpdateStrategy`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from strategies.common import RoundUpdates, UpdateStrategy


# --- geometric median (RFA) --------------------------------------------------------------------
def geometric_median(
    points: np.ndarray, alphas: np.ndarray, nu: float = 1e-6, maxiter: int = 4, ftol: float = 1e-6
) -> tuple[np.ndarray, int]:
    """Smoothed Weiszfeld (Pillutla, Kakade & Harchaoui, IEEE TSP 2022, Alg. 3).

    Minimises ``sum_i alpha_i * max(nu, ||z - w_i||)``: start at the weighted mean, then
    ``beta_i = alpha_i / max(nu, ||z - w_i||)``, ``z = sum beta_i w_i / sum beta_i``; stop after
    ``maxiter`` steps or when the objective improves by less than ``ftol`` (relative).
    Returns ``(z, iterations)``. Defaults are the authors' code (``maxiter=4``, ``ftol=1e-6``).
    """
    a = np.asarray(alphas, dtype=np.float64)
    a = a / a.sum()
    z = (a[:, None] * points).sum(0)

    def objective(z: np.ndarray) -> float:
        return float((a * np.maximum(nu, np.linalg.norm(points - z, axis=1))).sum())

    obj, iters = objective(z), 0
    while iters < maxiter:
        iters += 1
        beta = a / np.maximum(nu, np.linalg.norm(points - z, axis=1))
        z = (beta[:, None] * points).sum(0) / beta.sum()
        new = objective(z)
        if abs(obj - new) < ftol * obj:
            break
        obj = new
    return z, iters


class GeoMed(UpdateStrategy):
    """RFA (Pillutla et al. 2022, Alg. 2): the new global model is ``x + GM(Delta_i; alpha_i)``,
    the (smoothed) geometric median of the updates, ``alpha_i`` proportional to the number of
    examples (``weighted=False``: uniform, as in the MUD-HoG authors' ``gm`` baseline)."""

    def __init__(self, nu: float = 1e-6, maxiter: int = 4, ftol: float = 1e-6, weighted: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if nu <= 0 or maxiter < 1:
            raise ValueError("strategy.nu must be > 0 and strategy.maxiter >= 1")
        self.nu, self.maxiter, self.ftol, self.weighted = float(nu), int(maxiter), float(ftol), bool(weighted)

    def aggregate_updates(self, server_round: int, ru: RoundUpdates) -> np.ndarray | None:
        if not ru.node_ids:
            return None
        alphas = ru.num_examples if self.weighted else np.ones(len(ru.node_ids))
        z, _ = geometric_median(ru.updates, alphas, self.nu, self.maxiter, self.ftol)
        return self.global_vec + z

    checkpoint_attrs = ("dropped",)  # fedsim.checkpoint: no server memory


# --- FoolsGold ---------------------------------------------------------------------------------
def foolsgold_weights(history: np.ndarray, kappa: float = 1.0) -> np.ndarray:
    """FoolsGold's per-client learning rates (Fung, Yoon & Beschastnikh, RAID 2020, Alg. 1).

    ``cs_ij`` = cosine of the clients' aggregate historical updates (i != j); ``v_i = max_j
    cs_ij``; pardoning ``cs_ij *= v_i / v_j`` when ``v_j > v_i``; ``alpha_i = 1 - max_j cs_ij``
    clipped to [0, 1], divided by its maximum, ``alpha_i = kappa (ln(alpha_i / (1 - alpha_i)) +
    0.5)`` clipped to [0, 1] (``alpha = 1`` is first set to 0.99, as in the authors' code).
    """
    n = history.shape[0]
    if n == 1:
        return np.ones(1)
    norms = np.linalg.norm(history, axis=1)
    unit = history / np.where(norms > 0, norms, 1.0)[:, None]
    cs = unit @ unit.T - np.eye(n)
    v = cs.max(axis=1)
    for i in range(n):
        for j in range(n):
            if i != j and v[i] < v[j]:
                cs[i, j] *= v[i] / v[j]
    wv = np.clip(1.0 - cs.max(axis=1), 0.0, 1.0)
    if wv.max() <= 0:
        return np.zeros(n)
    wv = wv / wv.max()
    wv[wv == 1.0] = 0.99
    with np.errstate(divide="ignore"):
        wv = kappa * (np.log(wv / (1.0 - wv)) + 0.5)
    wv[np.isinf(wv) & (wv > 0)] = 1.0
    return np.clip(np.nan_to_num(wv, nan=0.0, neginf=0.0), 0.0, 1.0)


def output_layer_slice(template: ArrayRecord) -> slice:
    """Where the output layer's weight lies in :func:`strategies.common.flatten_record`'s vector:
    the last floating-point array with two or more dimensions (the final Linear's weight matrix;
    its bias is left out, as in the FoolsGold authors' ``client_grads[i][-2]``)."""
    pos, found = 0, None
    for arr in template.values():
        if "float" not in arr.dtype:
            continue
        size = int(np.prod(arr.shape)) if arr.shape else 1
        if len(arr.shape) >= 2:
            found = slice(pos, pos + size)
        pos += size
    if found is None:
        raise ValueError("strategy.similarity=output: the model has no weight matrix (no float array with ndim >= 2)")
    return found


class FoolsGold(UpdateStrategy):
    """FoolsGold: ``x + sum_i alpha_i Delta_i / Z`` with :func:`foolsgold_weights` on each
    client's running sum of updates.

    ``similarity`` picks what the cosine similarities are measured on: ``all`` (every
    parameter, the paper's Alg. 1; default) or ``output`` (the output layer's weight matrix
    only, as the authors' deep-learning code does: ``DistributedML/FoolsGold``,
    ``deep-fg/fg/trainer.py``, ``aggregate_gradients`` keeps its memory of ``client_grads[i][-2]``,
    the last layer's weight; the weighted sum still covers every parameter).

    The paper adds ``sum_i alpha_i Delta_i`` to the model, where each ``Delta_i`` is one SGD
    gradient step. With multi-step local updates the sum over clients overshoots, so ``Z``
    is chosen by ``normalize``: ``n`` (the number of updates, as the authors' ``aggregate``
    code: all ``alpha = 1`` gives FedAvg's unweighted mean; default), ``weights``
    (``sum alpha``) or ``none`` (the paper's literal sum). ``flagged()`` labels the clients
    whose weight was 0 in the last round ``sybil``.
    """

    def __init__(self, kappa: float = 1.0, normalize: str = "n", similarity: str = "all", **kwargs) -> None:
        super().__init__(**kwargs)
        if normalize not in ("n", "weights", "none"):
            raise ValueError("strategy.normalize: must be n, weights or none")
        if similarity not in ("all", "output"):
            raise ValueError(f"strategy.similarity: must be all or output (got '{similarity}')")
        self.kappa, self.normalize, self.similarity = float(kappa), normalize, similarity
        self.history: dict[int, np.ndarray] = {}
        self.last_weights: dict[int, float] = {}

    def flagged(self) -> dict[int, str]:
        return {n: "sybil" for n, w in self.last_weights.items() if w <= 0.0}

    def aggregate_updates(self, server_round: int, ru: RoundUpdates) -> np.ndarray | None:
        if not ru.node_ids:
            return None
        part = slice(None) if self.similarity == "all" else output_layer_slice(self.global_arrays)
        for node, u in zip(ru.node_ids, ru.updates):
            self.history[node] = self.history.get(node, 0.0) + u[part]
        w = foolsgold_weights(np.stack([self.history[n] for n in ru.node_ids]), self.kappa)
        self.last_weights = dict(zip(ru.node_ids, w.tolist()))
        z = {"n": len(w), "weights": w.sum(), "none": 1.0}[self.normalize]
        if z <= 0:
            return self.global_vec.copy()
        return self.global_vec + (w[:, None] * ru.updates).sum(0) / z

    checkpoint_attrs = ("history", "last_weights", "dropped")  # fedsim.checkpoint


__all__ = ["geometric_median", "GeoMed", "foolsgold_weights", "output_layer_slice", "FoolsGold"]
