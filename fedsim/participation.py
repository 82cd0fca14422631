"""Participation models: who trains in a round, decided by the harness, not the strategy.

A model answers ``active(round) -> sorted partition ids``. Every draw comes from generators
keyed by (seed, "participation", ...), so the answer depends only on the config, never on the
engine or on execution order. Models are registered by name in :data:`PARTICIPATION`;
``participation.name`` selects one:

* ``sampled``: a seeded uniform fraction of clients per round (Flower's usual sampling);
* ``full``: everyone, every round;
* ``bernoulli``: client n joins with its own probability p_n, independently each round;
* ``markov``: a two-state chain per client with stationary probability p_n and speed q;
* ``cyclic``: blocks of active / inactive rounds whose lengths come from p_n and the cycle.

The last three are the participation patterns of FedAU (Wang & Ji, ICLR 2024, Sec. 6 and
App. D; authors' code IBM/fedau ``util/util.py: WorkerSampler``). Their per-client
probabilities p_n come from a generator named in ``participation.probs`` (see
:data:`PROB_GENERATORS`): ``constant``, ``uniform``, ``explicit``, or ``label_correlated`` (FedAU's
heterogeneous scheme, where p_n is correlated with the client's label mix so that plain
averaging over participants is biased).

Every model also reports what happened: :meth:`Participation.summary` turns the participants
of each round into per-client realised rates next to the p_n (the server writes it to
``participation.json`` and ``summary.json``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
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
        """Per-client participation probabilities p_n (index = partition id), where the model has them."""
        return None

    @classmethod
    def round_sizes(cls, cfg: Any, num_clients: int) -> tuple[int, int]:
        """(fewest, most) clients this model can make active in one round, from the config alone
        (used to check strategies' minimums before start). Random models: (0, num_clients)."""
        return 0, num_clients

    def summary(self, participants: Mapping[int, Iterable[int]]) -> dict[str, Any]:
        """Probabilities and realised participation, from ``{round: partition ids that were active}``.

        ``realised_rate[n]`` is the fraction of the recorded rounds in which partition n was
        active; ``probabilities`` (when the model has them) are the p_n it was drawn from.
        """
        counts = np.zeros(self.n, dtype=np.int64)
        for pids in participants.values():
            for p in pids:
                counts[int(p)] += 1
        rounds = len(participants)
        out: dict[str, Any] = {
            "model": str(self.cfg.name),
            "rounds": rounds,
            "mean_participants": float(counts.sum() / rounds) if rounds else 0.0,
            "counts": counts.tolist(),
            "realised_rate": (counts / rounds).round(6).tolist() if rounds else [0.0] * self.n,
        }
        p = self.probabilities()
        if p is not None:
            out["probabilities"] = np.round(p, 6).tolist()
        return out


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

    def probabilities(self) -> np.ndarray:
        return np.ones(self.n)

    @classmethod
    def round_sizes(cls, cfg: Any, num_clients: int) -> tuple[int, int]:
        return num_clients, num_clients


@register_participation("sampled")
class Sampled(Participation):
    """A uniformly sampled fraction of clients per round (at least ``min_clients``),
    drawn from a generator keyed by (seed, round): Flower's usual sampling, but seeded."""

    @staticmethod
    def count(cfg: Any, num_clients: int) -> int:
        """Clients per round: ``min(max(int(fraction * N), min_clients), N)``."""
        return min(max(int(cfg.fraction * num_clients), int(cfg.min_clients)), num_clients)

    def _k(self) -> int:
        return self.count(self.cfg, self.n)

    @classmethod
    def round_sizes(cls, cfg: Any, num_clients: int) -> tuple[int, int]:
        k = cls.count(cfg, num_clients)
        return k, k

    def active(self, server_round: int) -> list[int]:
        k = self._k()
        if k == self.n:
            return list(range(self.n))
        rng = np_rng(self.seed, "participation", "sampled", server_round)
        return sorted(rng.choice(self.n, size=k, replace=False).tolist())

    def probabilities(self) -> np.ndarray:
        return np.full(self.n, self._k() / self.n)


# --- per-client probabilities p_n ----------------------------------------------------------------

#: generator name -> (allowed keys with defaults, function(spec, n, seed, context) -> p [n])
PROB_GENERATORS: dict[str, tuple[dict[str, Any], Callable[..., np.ndarray]]] = {}

#: ``participation.probs`` used when a model that needs p_n gets an empty one: FedAU's defaults.
DEFAULT_PROBS: dict[str, Any] = {"name": "label_correlated", "alpha": 0.1, "mean": 0.1, "min": 0.02}


def register_probs(
    name: str, **defaults: Any
) -> Callable[[Callable[..., np.ndarray]], Callable[..., np.ndarray]]:
    def deco(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        PROB_GENERATORS[name] = (defaults, fn)
        return fn

    return deco


@register_probs("constant", p=0.1)
def constant_probs(spec: Mapping[str, Any], n: int, seed: int, context: Mapping[str, Any]) -> np.ndarray:
    """p_n = p for every client."""
    return np.full(n, float(spec["p"]))


@register_probs("uniform", low=0.05, high=0.5)
def uniform_probs(spec: Mapping[str, Any], n: int, seed: int, context: Mapping[str, Any]) -> np.ndarray:
    """p_n ~ U[low, high] i.i.d. (seeded), independent of the data."""
    return np_rng(seed, "participation", "probs", "uniform").uniform(
        float(spec["low"]), float(spec["high"]), n
    )


@register_probs("explicit", values=None)
def explicit_probs(spec: Mapping[str, Any], n: int, seed: int, context: Mapping[str, Any]) -> np.ndarray:
    """p_n given in the config, one per partition id."""
    return np.asarray(list(spec["values"]), dtype=np.float64)


def label_correlated_from_histograms(
    hist: np.ndarray, alpha: float, mean: float, p_min: float, rng: np.random.Generator
) -> np.ndarray:
    """FedAU's heterogeneous participation probabilities (IBM/fedau ``data_participation_each_node``).

    ``m ~ Dir(alpha * 1_C)`` is drawn once; ``p_n = max(p_min, <q_n, m> * mean * C)`` where q_n is
    client n's empirical label distribution (row of ``hist`` normalised). Clients whose labels
    are favoured by m participate more, so the average over participants over-weights those
    labels. Two additions to the authors' code, neither active at its defaults: an empty
    partition has q_n = 0 (so p_n = p_min), and p_n is capped at 1 (``mean * C * <q_n, m>`` can
    exceed 1 only when ``mean > 1/C``).
    """
    hist = np.asarray(hist, dtype=np.float64)
    sizes = hist.sum(1, keepdims=True)
    q = np.divide(hist, sizes, out=np.zeros_like(hist), where=sizes > 0)
    c = hist.shape[1]
    m = rng.dirichlet(alpha * np.ones(c))
    return np.clip((q @ m) * mean * c, p_min, 1.0)


@register_probs("label_correlated", alpha=0.1, mean=0.1, min=0.02)
def label_correlated_probs(
    spec: Mapping[str, Any], n: int, seed: int, context: Mapping[str, Any]
) -> np.ndarray:
    """FedAU's scheme on the run's actual partitions (needs ``context['data']``)."""
    data = context.get("data")
    if data is None:
        raise ValueError(
            "participation.probs.name: 'label_correlated' needs the partitioned data (context['data'])"
        )
    labels = data.bundle.y_train.numpy()
    hist = np.stack([np.bincount(labels[p], minlength=data.num_classes) for p in data.partitions])
    if len(hist) != n:
        raise ValueError(f"participation.probs: {len(hist)} partitions for {n} clients")
    rng = np_rng(seed, "participation", "probs", "label_correlated")
    return label_correlated_from_histograms(
        hist, float(spec["alpha"]), float(spec["mean"]), float(spec["min"]), rng
    )


def probs_spec(cfg: Any) -> dict[str, Any]:
    """The probability generator spec with defaults filled in (``DEFAULT_PROBS`` when empty)."""
    given = dict(cfg.probs) if cfg.probs else dict(DEFAULT_PROBS)
    name = given.get("name")
    defaults, _ = PROB_GENERATORS[name]
    return {"name": name, **defaults, **{k: v for k, v in given.items() if k != "name"}}


def make_probabilities(cfg: Any, n: int, seed: int, context: Mapping[str, Any] | None = None) -> np.ndarray:
    """p_n for every partition from ``cfg.probs`` (see :data:`PROB_GENERATORS`)."""
    spec = probs_spec(cfg)
    p = PROB_GENERATORS[spec["name"]][1](spec, n, seed, context or {})
    if p.shape != (n,) or not np.all((p > 0) & (p <= 1)):
        raise ValueError(f"participation.probs: generator '{spec['name']}' gave probabilities outside (0, 1]")
    return p


class WithProbabilities(Participation):
    """A model driven by per-client probabilities p_n (computed once, from ``cfg.probs``)."""

    def __init__(self, cfg: Any, num_clients: int, seed: int, context: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, num_clients, seed, context)
        self.p = make_probabilities(cfg, num_clients, seed, self.context)

    def probabilities(self) -> np.ndarray:
        return self.p.copy()


@register_participation("bernoulli")
class Bernoulli(WithProbabilities):
    """I_n^t ~ Bern(p_n), independent across clients and rounds (FedAU's ``bernoulli``).

    The uniforms of round t come from a generator keyed by (seed, round), so any round can be
    asked for in any order.
    """

    def active(self, server_round: int) -> list[int]:
        u = np_rng(self.seed, "participation", "bernoulli", server_round).random(self.n)
        return np.flatnonzero(u < self.p).tolist()


def markov_transitions(p: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """(P(inactive->active), P(active->inactive)) of FedAU's ``markov-q`` chain.

    P(in->act) = q and P(act->in) = q (1/p - 1), whose stationary distribution is p; where the
    latter exceeds 1, both are divided by it (so P(act->in) = 1 and the stationary probability
    is still p). IBM/fedau ``WorkerSampler.__init__``.
    """
    p = np.asarray(p, dtype=np.float64)
    up = np.full_like(p, float(q))
    down = up * (1.0 / p - 1.0)
    scale = np.maximum(down, 1.0)
    return up / scale, down / scale


@register_participation("markov")
class Markov(WithProbabilities):
    """Two-state Markov chain per client with stationary probability p_n and speed ``q``.

    Initial state (round 0) ~ Bern(p_n); at every round the chain makes one transition and
    the new state is reported (as ``WorkerSampler.sample``: update, then return). The uniforms
    of round t come from a generator keyed by (seed, round), so the state at round r depends
    only on (seed, p, q, r): it is cached for the rounds asked in order (r = 1, 2, ...) and
    recomputed from round 0 if an earlier round is asked for (e.g. after resuming).
    """

    def __init__(self, cfg: Any, num_clients: int, seed: int, context: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, num_clients, seed, context)
        self.up, self.down = markov_transitions(self.p, float(cfg.q))
        self._reset()

    def _reset(self) -> None:
        self._round = 0
        self._state = np_rng(self.seed, "participation", "markov", "init").random(self.n) < self.p

    def state(self, server_round: int) -> np.ndarray:
        """Boolean activity of every client at ``server_round``."""
        if server_round < self._round:
            self._reset()
        while self._round < server_round:
            self._round += 1
            u = np_rng(self.seed, "participation", "markov", self._round).random(self.n)
            self._state = np.where(self._state, u >= self.down, u < self.up)
        return self._state.copy()

    def active(self, server_round: int) -> list[int]:
        return np.flatnonzero(self.state(server_round)).tolist()


def cyclic_blocks(p: np.ndarray, cycle: int) -> tuple[np.ndarray, np.ndarray]:
    """(active, inactive) block lengths: max(1, round(C p_n)) and max(1, C - active)."""
    active = np.maximum(1, np.round(cycle * np.asarray(p, dtype=np.float64)).astype(np.int64))
    return active, np.maximum(1, cycle - active)


def cyclic_active(
    server_round: int, active: np.ndarray, inactive: np.ndarray, offset: np.ndarray
) -> np.ndarray:
    """Closed form of FedAU's ``cyclic`` sampler at round ``server_round`` >= 1.

    The client starts inactive with ``offset`` rounds left (``rounds_to_switch``); the counter
    is checked before it is decremented, so rounds 1..offset are inactive, then ``active``
    rounds on, ``inactive`` off, and so on.
    """
    s = server_round - 1 - offset
    return (s >= 0) & (np.mod(s, active + inactive) < active)


@register_participation("cyclic")
class Cyclic(WithProbabilities):
    """Blocks of ``round(C p_n)`` active rounds and ``C - that`` inactive rounds (cycle C).

    Each client starts inactive with a seeded offset ~ U{0..inactive-1} (IBM/fedau
    ``WorkerSampler``, ``cyclic-C``); the long-run rate is active / (active + inactive) ~ p_n.
    """

    def __init__(self, cfg: Any, num_clients: int, seed: int, context: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, num_clients, seed, context)
        self.on, self.off = cyclic_blocks(self.p, int(cfg.cycle))
        self.offset = np_rng(seed, "participation", "cyclic", "offset").integers(0, self.off)

    def active(self, server_round: int) -> list[int]:
        return np.flatnonzero(cyclic_active(server_round, self.on, self.off, self.offset)).tolist()


# --- validation ----------------------------------------------------------------------------------


def _validate_probs(cfg: Any, num_clients: int) -> None:
    from fedsim.config import ConfigError

    if not cfg.probs:
        return
    given = dict(cfg.probs)
    name = given.get("name")
    if name not in PROB_GENERATORS:
        raise ConfigError(f"participation.probs.name: '{name}' is not one of {sorted(PROB_GENERATORS)}")
    defaults, _ = PROB_GENERATORS[name]
    for key in given:
        if key != "name" and key not in defaults:
            raise ConfigError(
                f"participation.probs.{key}: not a parameter of '{name}' (has {sorted(defaults)})"
            )
    spec = probs_spec(cfg)

    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"participation.probs.{key}: {msg} (got {spec.get(key)})")

    if name == "constant":
        check(0 < spec["p"] <= 1, "p", "must be in (0, 1]")
    elif name == "uniform":
        check(0 < spec["low"] <= 1, "low", "must be in (0, 1]")
        check(spec["low"] <= spec["high"] <= 1, "high", "must be in [low, 1]")
    elif name == "explicit":
        vals = spec["values"]
        check(
            vals is not None and len(vals) == num_clients,
            "values",
            f"needs one probability per client ({num_clients})",
        )
        check(all(0 < float(v) <= 1 for v in vals), "values", "every value must be in (0, 1]")
    elif name == "label_correlated":
        check(spec["alpha"] > 0, "alpha", "must be > 0")
        check(0 < spec["mean"] <= 1, "mean", "must be in (0, 1]")
        check(0 < spec["min"] <= 1, "min", "must be in (0, 1]")


def validate(cfg: Any, num_clients: int) -> None:
    """Check the participation config; raise ConfigError naming the key."""
    from fedsim.config import ConfigError

    if cfg.name not in PARTICIPATION:
        raise ConfigError(f"participation.name: '{cfg.name}' is not one of {sorted(PARTICIPATION)}")
    if not 0 < cfg.fraction <= 1:
        raise ConfigError(f"participation.fraction: must be in (0, 1] (got {cfg.fraction})")
    if cfg.min_clients < 0:
        raise ConfigError("participation.min_clients: must be >= 0")
    if not 0 < cfg.q <= 1:
        raise ConfigError(f"participation.q: must be in (0, 1] (got {cfg.q})")
    if cfg.cycle < 1:
        raise ConfigError(f"participation.cycle: must be >= 1 (got {cfg.cycle})")
    _validate_probs(cfg, num_clients)


def build(cfg: Any, num_clients: int, seed: int, context: dict[str, Any] | None = None) -> Participation:
    """Instantiate the participation model ``cfg.name``."""
    return PARTICIPATION[cfg.name](cfg, num_clients, seed, context)
