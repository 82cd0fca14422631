"""Colluding, omniscient attacks: the attackers craft one update from the benign updates.

Threat model (``docs/threat.md``): the attackers train honestly, then, knowing every benign
update of the round (the strongest, "omniscient" adversary of these papers), replace their own
updates before the server aggregates. The harness applies these :class:`ReplyTransform` s to the
attackers' replies on the server side (``fedsim.threat.ColludingHook``), before the strategy
sees anything, so every strategy faces them unchanged.

* :class:`ALIE` -- "A Little Is Enough" (Baruch, Baruch & Goldberg, NeurIPS 2019, Alg. 3):
  ``s = floor(n/2 + 1) - m``, ``z = Phi^-1((n - s) / n)``, every attacker sends
  ``mu - z * sigma`` (coordinate-wise mean and standard deviation of the benign updates).
  ``z_rule="honest"`` uses ``z = Phi^-1((n - m - s) / (n - m))`` instead, the form of many public
  reimplementations (e.g. Karimireddy, He & Jaggi's ``epfml/byzantine-robust-noniid-optimizer``,
  ``codes/attacks/alittle.py``): the quantile among the n - m honest workers.
* :class:`IPM` -- inner-product manipulation (Xie, Koyejo & Gupta, UAI 2019, §4):
  every attacker sends ``-epsilon * mean(benign)``.
* :class:`MinMax` -- AGR-agnostic Min-Max (Shejwalkar & Houmansadr, NDSS 2021, Eq. 5):
  ``mu + gamma * p`` with the largest ``gamma`` (binary search, authors' code) such that the
  attacker's largest distance to a benign update is at most the largest benign-benign distance;
  ``p`` is ``-mu/||mu||`` (``unit_vec``), ``-sign(mu)`` (``sign``) or ``-std`` (``std``).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch

from attacks.base import ReplyTransform


def _stack(updates: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([u.to(torch.float64) for u in updates])


Z_RULES = ("paper", "honest")


def alie_z(n: int, m: int, rule: str = "paper") -> float:
    """ALIE's ``z_max`` for ``n`` clients of which ``m`` are malicious; ``s = floor(n/2 + 1) - m``
    honest "supporters" are needed for a majority.

    * ``"paper"`` (Baruch et al. 2019, Alg. 3): ``Phi^-1((n - s) / n)``;
    * ``"honest"`` (reimplementations, e.g. epfml/byzantine-robust-noniid-optimizer):
      ``Phi^-1((n - m - s) / (n - m))``. It is smaller, and 0 or negative when few of the
      clients are malicious (n = 10: m = 2 gives 0, m = 1 gives -0.14), as those codes compute.

    The probability is clipped to [1e-6, 1 - 1e-6] (``s <= 0``, a malicious majority, would give
    z = inf); under ``"paper"`` also to >= 0.5, which only ``m = 0`` (no attacker) reaches.
    """
    if rule not in Z_RULES:
        raise ValueError(f"attack.z_rule: '{rule}' is not one of {Z_RULES}")
    s = math.floor(n / 2 + 1) - m
    p = (n - s) / n if rule == "paper" else (n - m - s) / max(n - m, 1)
    p = min(max(p, 0.5 if rule == "paper" else 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(p)


class ALIE(ReplyTransform):
    """A Little Is Enough: ``mu - z * sigma`` for every attacker.

    ``z=None`` uses :func:`alie_z` with ``z_rule`` (``paper``, default, or ``honest``, see the
    module docstring); ``stats_from`` picks the updates mu and sigma come from: ``benign``
    (omniscient, default), ``malicious`` (the attackers' own honest updates, the paper's
    non-omniscient variant) or ``all``. ``n`` is the round's number of replies, ``m`` the
    number of attackers among them.
    """

    def __init__(self, z: float | None = None, stats_from: str = "benign", z_rule: str = "paper") -> None:
        if stats_from not in ("benign", "malicious", "all"):
            raise ValueError("attack.stats_from: must be benign, malicious or all")
        if z_rule not in Z_RULES:
            raise ValueError(f"attack.z_rule: '{z_rule}' is not one of {Z_RULES}")
        if z is not None and z_rule != "paper":
            raise ValueError("attack.z_rule: only used when attack.z is null (a fixed z was given)")
        self.z, self.stats_from, self.z_rule = z, stats_from, z_rule

    def apply(self, benign, malicious, rng):
        ref = {"benign": benign, "malicious": malicious, "all": benign + malicious}[self.stats_from]
        if not malicious or not ref:
            return malicious
        x = _stack(ref)
        mu, sigma = x.mean(0), x.std(0, unbiased=False)
        z = self.z if self.z is not None else alie_z(len(benign) + len(malicious), len(malicious), self.z_rule)
        return [mu - z * sigma for _ in malicious]


class IPM(ReplyTransform):
    """Inner-product manipulation: ``-epsilon * mean(benign)`` for every attacker."""

    def __init__(self, epsilon: float = 0.1) -> None:
        self.epsilon = float(epsilon)

    def apply(self, benign, malicious, rng):
        if not malicious or not benign:
            return malicious
        mu = _stack(benign).mean(0)
        return [-self.epsilon * mu for _ in malicious]


def minmax_gamma(benign: torch.Tensor, mu: torch.Tensor, p: torch.Tensor, gamma_init: float, tau: float) -> float:
    """Largest ``gamma`` with ``max_i ||mu + gamma p - b_i|| <= max_{i,j} ||b_i - b_j||``.

    Binary search as in the authors' code: start at ``gamma_init``, halve the step each time,
    stop when successive values differ by less than ``tau``.
    """
    threshold = torch.cdist(benign, benign).max()
    gamma, step, good = float(gamma_init), float(gamma_init), 0.0
    while abs(good - gamma) > tau:
        if torch.linalg.norm(benign - (mu + gamma * p), dim=1).max() <= threshold:
            good = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return good


class MinMax(ReplyTransform):
    """AGR-agnostic Min-Max (Shejwalkar & Houmansadr 2021)."""

    def __init__(self, dev: str = "unit_vec", gamma_init: float = 50.0, tau: float = 1e-5) -> None:
        if dev not in ("unit_vec", "sign", "std"):
            raise ValueError("attack.dev: must be unit_vec, sign or std")
        self.dev, self.gamma_init, self.tau = dev, float(gamma_init), float(tau)

    def direction(self, benign: torch.Tensor) -> torch.Tensor:
        mu = benign.mean(0)
        if self.dev == "unit_vec":
            return -mu / torch.linalg.norm(mu).clamp_min(1e-12)
        if self.dev == "sign":
            return -torch.sign(mu)
        return -benign.std(0, unbiased=False)

    def apply(self, benign, malicious, rng: np.random.Generator):
        if not malicious or len(benign) < 2:
            return malicious
        b = _stack(benign)
        mu, p = b.mean(0), self.direction(b)
        gamma = minmax_gamma(b, mu, p, self.gamma_init, self.tau)
        return [mu + gamma * p for _ in malicious]
