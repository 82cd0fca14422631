"""FedAU and the baselines of its paper, for unknown and heterogeneous client participation.

Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in Federated
Averaging", ICLR 2024 (authors' code IBM/fedau ``main.py``; spec: algorithms.md section 1).

Client n takes part in round t with an unknown, heterogeneous probability p_n. Averaging the
updates of the participants optimises sum_n p_n F_n instead of the intended sum_n F_n / N.
FedAU weights each participant's update by an online estimate of 1/p_n, the mean length of
its participation intervals, and averages over all N clients:

    x^{t+1} = x^t + eta_g * (1/N) * sum_{n in S_t} omega_n^t * Delta_n^t        (Alg. 1, line 9)

All strategies here share one update form, x <- x + eta_g * direction, and differ only in the
direction (one pure function each, unit-tested), and in the server memory they keep:

============================  ==============================================  =================
class                         direction                                       server memory
============================  ==============================================  =================
:class:`FedAU`                (1/N) sum_S omega_n Delta_n                     O(N) floats
:class:`AvgParticipating`     mean_S Delta_n                                  none
:class:`AvgAll`               (1/N) sum_S Delta_n                             none
:class:`KnownProb` (oracle)   (1/N) sum_S Delta_n / p_n                       O(N) (the true p)
:class:`MIFA`                 mean_N(latest Delta_n)                          O(N d) floats
:class:`FedVarp`              mean_N(y_old) + mean_S(Delta_n - y_n,old)       O(N d) floats
============================  ==============================================  =================

**Who counts as a participant.** The server observes participation as the arrival of a valid
update: a client the participation model made active but whose reply failed, timed out or
was not finite (dropped by the harness) is treated as not participating in that round, by
every strategy here. For FedAU this means omega_n estimates the inverse of the rate at which
the server *receives* n's updates, which is what the unbiasedness argument needs (a failed
client contributes nothing, exactly as an inactive one).

**Unweighted.** As in the paper, all averages are unweighted (no num-examples weights). With
full participation and no failures FedAU, AvgParticipating and AvgAll all reduce to FedAvg
with equal client weights: x + eta_g * mean_N Delta_n.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from strategies.common import RoundUpdates, UpdateStrategy

__all__ = [
    "IntervalEstimator",
    "fedau_direction",
    "average_participating",
    "average_all",
    "known_prob_direction",
    "mifa_direction",
    "fedvarp_direction",
    "FedAU",
    "AvgParticipating",
    "AvgAll",
    "KnownProb",
    "MIFA",
    "FedVarp",
]


# --- the estimator -------------------------------------------------------------------------------


class IntervalEstimator:
    """FedAU's online estimate of omega_n ~ 1/p_n (Alg. 2, OnlineWeightEstimation).

    Per client it keeps S (rounds since the last recorded interval), M (intervals recorded)
    and Omega (their running mean): three numbers, so O(N) memory. Each round, for every
    client n (participating or not)::

        S <- S + 1
        if I_n^t == 1 or S == K:   Omega <- S if M == 0 else (M * Omega + S) / (M + 1);  M += 1;  S <- 0

    :meth:`weights` gives omega_n for the *current* round and must be read before
    :meth:`observe` records the current round's participation: omega_n^t depends only on
    I_n^0..I_n^{t-1} (the independence the paper's analysis needs). Before the first recorded
    interval omega_n = 1, so a client's first participation gets weight 1.

    ``cutoff`` K bounds the intervals (and the weights) at K: after K rounds without
    participation an interval of length K is recorded and counting restarts. ``None`` (or
    ``inf``) means K = infinity. This is the same rule as the authors' list-of-intervals code
    (IBM/fedau ``main.py``: on participation append cnt + 1; otherwise cnt += 1 and, if
    cnt >= K, append cnt and reset).
    """

    def __init__(self, num_clients: int, cutoff: float | None = None) -> None:
        if cutoff is not None and not (cutoff >= 1):
            raise ValueError(f"strategy.cutoff: must be >= 1 or null (got {cutoff})")
        self.n = int(num_clients)
        self.cutoff = math.inf if cutoff is None else float(cutoff)
        self.since = np.zeros(self.n, dtype=np.int64)  # S
        self.count = np.zeros(self.n, dtype=np.int64)  # M
        self.mean = np.zeros(self.n, dtype=np.float64)  # Omega

    def weights(self) -> np.ndarray:
        """omega_n for the current round: the mean recorded interval, or 1 before the first."""
        return np.where(self.count > 0, self.mean, 1.0)

    def observe(self, participated: np.ndarray | Sequence[bool]) -> None:
        """Record one round's participation indicators I_n^t (length N, bool)."""
        part = np.asarray(participated, dtype=bool)
        if part.shape != (self.n,):
            raise ValueError(f"participated: expected {self.n} indicators, got shape {part.shape}")
        self.since += 1
        close = part | (self.since >= self.cutoff)
        m = self.count[close]
        self.mean[close] = (m * self.mean[close] + self.since[close]) / (m + 1)
        self.count[close] += 1
        self.since[close] = 0


# --- directions (pure) ---------------------------------------------------------------------------


def fedau_direction(updates: np.ndarray, weights: np.ndarray, num_clients: int) -> np.ndarray:
    """(1/N) sum_{n in S} omega_n Delta_n: FedAU (Alg. 1 line 9); ``updates`` rows are S."""
    updates = np.asarray(updates, dtype=np.float64)
    return (np.asarray(weights, dtype=np.float64)[:, None] * updates).sum(0) / num_clients


def average_participating(updates: np.ndarray) -> np.ndarray:
    """mean_{n in S} Delta_n (``average_participating``); zero when nobody took part."""
    updates = np.asarray(updates, dtype=np.float64)
    return updates.mean(0) if len(updates) else np.zeros(updates.shape[1])


def average_all(updates: np.ndarray, num_clients: int) -> np.ndarray:
    """(1/N) sum_{n in S} Delta_n (``average_all``): non-participants count as zero updates."""
    return np.asarray(updates, dtype=np.float64).sum(0) / num_clients


def known_prob_direction(updates: np.ndarray, probs: np.ndarray, num_clients: int) -> np.ndarray:
    """(1/N) sum_{n in S} Delta_n / p_n (``known_prob``): unbiased when p_n are the true rates."""
    return fedau_direction(updates, 1.0 / np.asarray(probs, dtype=np.float64), num_clients)


def mifa_direction(memory: np.ndarray, idx: np.ndarray, updates: np.ndarray) -> np.ndarray:
    """MIFA (Gu et al., NeurIPS 2021): overwrite the stored updates of S, return mean_N(memory).

    ``memory`` [N, d] holds every client's latest update (zeros before its first participation)
    and is updated in place. The direction is applied every round, also when S is empty.
    """
    if len(idx):
        memory[idx] = updates
    return memory.mean(0, dtype=np.float64)


def fedvarp_direction(memory: np.ndarray, idx: np.ndarray, updates: np.ndarray) -> np.ndarray:
    """FedVarp (Jhunjhunwala et al., UAI 2022) as in IBM/fedau ``main.py``.

    direction = ybar + mean_{n in S}(Delta_n - y_n), with y_n the stored latest update of n
    (zeros before its first participation) and ybar = mean_N(y) *before* this round's
    overwrite (the authors keep ybar from the end of the previous round: the same value);
    then y_n <- Delta_n for n in S (``memory`` [N, d] is updated in place). With S empty the
    direction is zero and nothing changes (the authors' code path for ``accumulated == 0``).
    """
    if not len(idx):
        return np.zeros(memory.shape[1])
    ybar = memory.mean(0, dtype=np.float64)
    updates = np.asarray(updates, dtype=np.float64)
    direction = ybar + (updates - memory[idx]).mean(0)
    memory[idx] = updates
    return direction


# --- strategies ----------------------------------------------------------------------------------


class _GlobalStep(UpdateStrategy):
    """x <- x + global_lr * direction(round's updates); subclasses give the direction.

    Participants are indexed by partition id (0..N-1); N is every registered client.
    """

    def __init__(self, global_lr: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not global_lr > 0:
            raise ValueError(f"strategy.global_lr: must be > 0 (got {global_lr})")
        self.global_lr = float(global_lr)

    def participant_index(self, ru: RoundUpdates) -> np.ndarray:
        """Partition ids of the clients whose valid update arrived this round (rows of ``ru``)."""
        return np.asarray([self.node_to_pid[n] for n in ru.node_ids], dtype=np.int64)

    @abstractmethod
    def direction(self, server_round: int, idx: np.ndarray, updates: np.ndarray) -> np.ndarray:
        """The step direction from this round's participants (partition ids ``idx``)."""

    def aggregate_updates(self, server_round: int, ru: RoundUpdates) -> np.ndarray | None:
        if self.global_vec is None:
            return None
        step = self.direction(server_round, self.participant_index(ru), ru.updates)
        return self.global_vec + self.global_lr * step


class FedAU(_GlobalStep):
    """FedAU: participants weighted by the online 1/p_n estimate, averaged over all N.

    Args:
        global_lr: eta_g (paper default 1.0).
        cutoff: K, the interval cutoff; ``None`` = infinity (paper: K = infinity and K = 50;
            the authors' default 100000 is effectively infinity).

    Server memory: O(N) numbers (three per client: S, M, Omega; see :class:`IntervalEstimator`).
    The estimator observes all N clients every round (non-participants advance their counter),
    and reads omega before recording the current round.
    """

    def __init__(self, global_lr: float = 1.0, cutoff: int | None = None, **kwargs) -> None:
        super().__init__(global_lr=global_lr, **kwargs)
        IntervalEstimator(1, cutoff)  # fail at instantiation on a bad cutoff
        self.cutoff = cutoff
        self.estimator: IntervalEstimator | None = None
        self.last_weights: dict[int, float] = {}

    def direction(self, server_round: int, idx: np.ndarray, updates: np.ndarray) -> np.ndarray:
        if self.estimator is None:
            self.estimator = IntervalEstimator(self.num_clients, self.cutoff)
        omega = self.estimator.weights()[idx]
        participated = np.zeros(self.num_clients, dtype=bool)
        participated[idx] = True
        self.estimator.observe(participated)
        self.last_weights = {int(p): float(w) for p, w in zip(idx, omega)}
        return fedau_direction(updates, omega, self.num_clients)

    checkpoint_attrs = ("estimator", "last_weights", "dropped")  # fedsim.checkpoint


class AvgParticipating(_GlobalStep):
    """Baseline ``average_participating``: x + eta_g mean_S Delta_n (biased under heterogeneous p_n).

    This is FedAvg with equal client weights over whoever took part. No server memory.
    """

    def direction(self, server_round: int, idx: np.ndarray, updates: np.ndarray) -> np.ndarray:
        if not len(idx):
            return np.zeros_like(self.global_vec)
        return average_participating(updates)

    checkpoint_attrs = ("dropped",)  # fedsim.checkpoint: no server memory


class AvgAll(_GlobalStep):
    """Baseline ``average_all``: x + eta_g (1/N) sum_S Delta_n. No server memory.

    Unbiased only for equal p_n; its effective step is p times smaller, hence the large eta_g
    (10) in the authors' commands.
    """

    def direction(self, server_round: int, idx: np.ndarray, updates: np.ndarray) -> np.ndarray:
        if not len(idx):
            return np.zeros_like(self.global_vec)
        return average_all(updates, self.num_clients)

    checkpoint_attrs = ("dropped",)  # fedsim.checkpoint: no server memory


class KnownProb(_GlobalStep):
    """Oracle baseline ``known_prob``: x + eta_g (1/N) sum_S Delta_n / p_n with the TRUE p_n.

    The p_n are read from the harness's participation model
    (``grid.participation.probabilities()``) in :meth:`bind_harness`. A real server does not
    know them: this is the oracle FedAU is compared with, not a deployable method. For the
    Markov and cyclic models p_n is the stationary / long-run rate, as in the authors' code.
    Memory: O(N) (the p_n).
    """

    def __init__(self, global_lr: float = 1.0, **kwargs) -> None:
        super().__init__(global_lr=global_lr, **kwargs)
        self.probs: np.ndarray | None = None

    def bind_harness(self, grid) -> None:  # noqa: ANN001
        super().bind_harness(grid)
        probs = grid.participation.probabilities()
        if probs is None:
            raise ValueError(
                f"strategy KnownProb: participation model '{grid.participation.cfg.name}' has no probabilities"
            )
        self.probs = np.asarray(probs, dtype=np.float64)

    def direction(self, server_round: int, idx: np.ndarray, updates: np.ndarray) -> np.ndarray:
        if self.probs is None:
            raise RuntimeError("KnownProb needs fedsim's harness (bind_harness) to learn p_n")
        if not len(idx):
            return np.zeros_like(self.global_vec)
        return known_prob_direction(updates, self.probs[idx], self.num_clients)

    checkpoint_attrs = ("dropped",)  # fedsim.checkpoint: p_n come from bind_harness


class _Memory(_GlobalStep):
    """Keeps the latest update of every client: an [N, d] float32 array (O(N d) server memory,
    N * d * 4 bytes: 250 clients x 55k parameters = 55 MB)."""

    def __init__(self, global_lr: float = 1.0, **kwargs) -> None:
        super().__init__(global_lr=global_lr, **kwargs)
        self.memory: np.ndarray | None = None

    def _mem(self, d: int) -> np.ndarray:
        if self.memory is None:
            self.memory = np.zeros((self.num_clients, d), dtype=np.float32)
        return self.memory


class MIFA(_Memory):
    """MIFA (Gu et al. 2021) as in IBM/fedau: x + eta_g mean_N(latest Delta_n of every client).

    Stored updates start at zero; the step is taken every round, also when nobody took part.
    Server memory O(N d).
    """

    def direction(self, server_round: int, idx: np.ndarray, updates: np.ndarray) -> np.ndarray:
        return mifa_direction(self._mem(self.global_vec.size), idx, updates)

    checkpoint_attrs = ("memory", "dropped")  # fedsim.checkpoint


class FedVarp(_Memory):
    """FedVarp (Jhunjhunwala et al. 2022) as in IBM/fedau: x + eta_g [ybar + mean_S(Delta_n - y_n)].

    See :func:`fedvarp_direction`. Server memory O(N d).
    """

    def direction(self, server_round: int, idx: np.ndarray, updates: np.ndarray) -> np.ndarray:
        return fedvarp_direction(self._mem(self.global_vec.size), idx, updates)

    checkpoint_attrs = ("memory", "dropped")  # fedsim.checkpoint
