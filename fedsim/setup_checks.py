"""Checks that need the strategy, the participation model and the threat model together
(and ``device``, which needs torch).

:func:`fedsim.config.validate` calls :func:`check_setup` after the per-key checks, before any
data is loaded. It builds the strategy once (constructors are cheap and check their own
arguments), then runs, for the strategy's class and each of its base classes:

1. the harness's table :data:`CHECKS` (keyed by ``module.QualName``) -- the constraints of
   Flower's built-in strategies, which fedsim cannot edit: FedAvg's ``fraction_*`` and
   ``min_*_nodes`` (which otherwise make Flower wait for nodes forever), Krum / Multi-Krum's
   n > 2f + 2, Bulyan's n >= 4f + 3, FedTrimmedAvg's beta;
2. :data:`CLIENT_REQUIREMENTS` and a class attribute ``client_requires`` (``{client key: value}``):
   ``client.*`` values a strategy's local algorithm needs (the momentum family's plain-SGD steps);
3. a ``check_setup(setup)`` hook the strategy may define (a classmethod or a method): any
   strategy, a user's included, plugs its own constraints in there. It receives a
   :class:`SetupInfo` and raises :class:`~fedsim.config.ConfigError` for an impossible setup,
   or calls ``setup.warn(message)`` for a legal but suspicious one.

Counts use the clients that actually train in a round: what the participation model makes
active (:meth:`fedsim.participation.Participation.round_sizes`) times ``fraction_train``. An
impossible setup is an error naming the keys to change; one that only some rounds violate
(random participation) or that silently degrades (a threat fraction that rounds to 0 attackers,
a trimmed mean that trims nothing) is a warning naming the count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedsim.config import ConfigError

log = logging.getLogger("fedsim")


@dataclass
class SetupInfo:
    """What a setup check may read: the whole config and the per-round client counts."""

    cfg: DictConfig
    num_clients: int
    active: tuple[int, int]  # fewest, most clients the participation model makes active in a round
    warnings: list[str] = field(default_factory=list)

    @property
    def fixed(self) -> bool:
        """True when every round has the same number of active clients."""
        return self.active[0] == self.active[1]

    def trained(self, strategy: Any) -> tuple[int, int]:
        """Fewest, most clients a FedAvg-style strategy trains in a round (replies if none fail)."""
        frac = float(getattr(strategy, "fraction_train", 1.0))
        mins = int(getattr(strategy, "min_train_nodes", 0) or 0)
        return tuple(max(int(a * frac), min(mins, a)) for a in self.active)  # type: ignore[return-value]

    def participation_keys(self) -> str:
        """How to say which keys set the per-round count."""
        p = self.cfg.participation
        if p.name == "sampled":
            return f"num_clients={self.num_clients}, participation.fraction={p.fraction}, participation.min_clients={p.min_clients}"
        return f"num_clients={self.num_clients}, participation={p.name}"

    def per_round(self, what: str = "train") -> str:
        lo, hi = self.active
        if self.fixed:
            return f"{lo} clients {what} per round ({self.participation_keys()})"
        return f"between {lo} and {hi} clients {what} per round ({self.participation_keys()})"

    def warn(self, message: str) -> None:
        """Record and log a warning (a legal setup that probably does not do what was meant)."""
        self.warnings.append(message)
        log.warning("config warning: %s", message)


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"{key}: {msg}")


def check_device(device: str) -> None:
    """``device`` must name something this machine has (``auto`` always does)."""
    if device in ("auto", "cpu"):
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: '{device}' but PyTorch sees no CUDA device (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}); use device=auto or device=cpu"
            )
        idx = device.partition(":")[2]
        if idx and (not idx.isdigit() or int(idx) >= torch.cuda.device_count()):
            raise ConfigError(f"device: '{device}' but this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    try:
        torch.device(device)  # other backends (mps, xpu, ...) are checked by torch when used
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: '{device}' is not auto, cpu, cuda, cuda:N or another torch device") from None


# --- Flower's built-in strategies ------------------------------------------------------------


def _check_fedavg(s: Any, setup: SetupInfo) -> None:
    """FedAvg's sampling: ``sample_nodes`` loops (sleep 1 s) until the grid shows
    ``max(min_available_nodes, max(int(n * fraction), min_*_nodes))`` nodes. In fedsim the active
    nodes of a round are fixed by the participation model, so a larger demand can never be met."""
    lo, hi = setup.active
    for kind in ("train", "evaluate"):
        frac = float(getattr(s, f"fraction_{kind}", 0.0))
        if not 0.0 <= frac <= 1.0:
            _fail(
                f"strategy.fraction_{kind}",
                f"must be in [0, 1] (got {frac}); participation decides who is active, the strategy "
                f"takes this fraction of them (keep 1.0, set participation.fraction instead)",
            )
    needs = [("min_available_nodes", int(getattr(s, "min_available_nodes", 0) or 0))]
    if float(getattr(s, "fraction_train", 0.0)) > 0:
        needs.append(("min_train_nodes", int(getattr(s, "min_train_nodes", 0) or 0)))
    if float(getattr(s, "fraction_evaluate", 0.0)) > 0:
        needs.append(("min_evaluate_nodes", int(getattr(s, "min_evaluate_nodes", 0) or 0)))
    for key, need in needs:
        if need > setup.num_clients:
            _fail(f"strategy.{key}", f"{need} but there are only num_clients={setup.num_clients} clients; the run would wait for nodes forever")
        if need > lo:
            _fail(
                f"strategy.{key}",
                f"{need} but participation makes {setup.per_round('active')}, and a round's active "
                f"clients are fixed, so such a round can never have {need} (Flower's strategies would wait "
                f"forever); set strategy.{key}<={lo} "
                f"(0 lets participation decide)" + (" or raise participation.fraction / participation.min_clients" if setup.cfg.participation.name == "sampled" else ""),
            )


def _check_multikrum(s: Any, setup: SetupInfo) -> None:
    """Krum / Multi-Krum (Blanchard et al., NeurIPS 2017, Prop. 1): the guarantee needs n > 2f + 2
    updates; m <= n.

    n <= 2f + 2 is a warning, not an error: Flower's Krum still scores each update against its
    max(1, n - f - 2) nearest ones, and papers run it beyond its guarantee on purpose (MUD-HoG's
    47.5 % attackers with f = 19 of 40) to show that it breaks."""
    f = int(s.num_malicious_nodes)
    m = int(getattr(s, "num_nodes_to_select", 1))
    name = type(s).__name__
    if f < 0:
        _fail("strategy.num_malicious_nodes", f"must be >= 0 (got {f})")
    if m < 1:
        _fail("strategy.num_nodes_to_select", f"must be >= 1 (got {m})")
    lo, hi = setup.trained(s)
    if lo <= 2 * f + 2:
        some = "rounds" if hi <= 2 * f + 2 else "some rounds"
        setup.warn(
            f"strategy.num_malicious_nodes: {some} have <= 2f+2 = {2 * f + 2} updates ({setup.per_round()}), "
            f"outside {name}'s guarantee (Blanchard et al. 2017); each update is scored against its "
            f"max(1, n-f-2) nearest; lower strategy.num_malicious_nodes (f={f}) or raise num_clients "
            f"if that is not what you meant"
        )
    if m > lo:
        if m > hi:
            _fail("strategy.num_nodes_to_select", f"{m} but only {setup.per_round()}; Multi-Krum would average every update")
        setup.warn(f"strategy.num_nodes_to_select: {m} but some rounds have fewer updates ({setup.per_round()}); those average every update")
    elif m > lo - f and m > 1:
        setup.warn(f"strategy.num_nodes_to_select: {m} > n - f = {lo - f} (the paper's m = n - f); the selection can include attackers")


def _check_bulyan(s: Any, setup: SetupInfo) -> None:
    """Bulyan (El Mhamdi et al., ICML 2018): n >= 4f + 3; Flower skips aggregation otherwise."""
    f = int(s.num_malicious_nodes)
    if f < 0:
        _fail("strategy.num_malicious_nodes", f"must be >= 0 (got {f})")
    lo, hi = setup.trained(s)
    need = 4 * f + 3
    if hi < need:
        _fail(
            "strategy.num_malicious_nodes",
            f"Bulyan needs at least 4f+3 = {need} updates per round (El Mhamdi et al. 2018) but "
            f"{setup.per_round()}: every round would skip aggregation; lower strategy.num_malicious_nodes "
            f"(f={f}) or raise num_clients",
        )
    if lo < need:
        setup.warn(f"strategy.num_malicious_nodes: rounds with fewer than 4f+3 = {need} updates skip Bulyan's aggregation ({setup.per_round()})")


def _check_trimmed(s: Any, setup: SetupInfo) -> None:
    """FedTrimmedAvg: beta in [0, 0.5); int(beta * n) updates are cut from each end."""
    beta = float(s.beta)
    if not 0.0 <= beta < 0.5:
        _fail("strategy.beta", f"must be in [0, 0.5) (got {beta})")
    lo, _ = setup.trained(s)
    if beta > 0 and lo > 0 and int(beta * lo) == 0:
        setup.warn(
            f"strategy.beta: {beta} of {lo} updates trims int({beta}*{lo}) = 0 from each end (a plain mean) "
            f"in rounds with {lo} updates; use beta >= {1 / lo:.3g}"
        )


def _check_mudhog(s: Any, setup: SetupInfo) -> None:
    """MUD-HoG's DBSCAN: with fewer points than ``min_samples`` no cluster forms (all noise)."""
    ms = int(getattr(s, "min_samples", 0) or 0)
    lo, _ = setup.trained(s)
    if 0 < lo < ms:
        setup.warn(
            f"strategy.dbscan_min_samples: DBSCAN needs {ms} points to form a cluster but rounds have "
            f"{lo} updates ({setup.per_round()}): every update is DBSCAN noise there"
        )


def _check_update_strategy(s: Any, setup: SetupInfo) -> None:
    """fedsim's UpdateStrategy trains every active client (participation samples, the strategy
    does not): a ``fraction_train`` other than 0 (skip training) or 1 would be accepted and ignored."""
    frac = float(getattr(s, "fraction_train", 1.0))
    if frac not in (0.0, 1.0):
        _fail(
            "strategy.fraction_train",
            f"{type(s).__name__} trains every client participation makes active, so {frac} would be "
            "ignored; keep 1.0 and set participation.fraction instead",
        )


#: ``module.QualName`` of a strategy class -> its setup check (applied to subclasses too).
CHECKS: dict[str, Callable[[Any, SetupInfo], None]] = {
    "flwr.serverapp.strategy.fedavg.FedAvg": _check_fedavg,
    "flwr.serverapp.strategy.multikrum.MultiKrum": _check_multikrum,
    "flwr.serverapp.strategy.bulyan.Bulyan": _check_bulyan,
    "flwr.serverapp.strategy.fedtrimmedavg.FedTrimmedAvg": _check_trimmed,
    "strategies.common.UpdateStrategy": _check_update_strategy,
    "strategies.mudhog.MudHoG": _check_mudhog,
}

#: ``module.QualName`` -> ``{client key: required value}`` for strategies whose local algorithm
#: needs them (a class may say the same with a ``client_requires`` attribute).
CLIENT_REQUIREMENTS: dict[str, dict[str, Any]] = {
    # local steps are plain SGD on the corrected direction (strategies/momentum.py docstring)
    "strategies.momentum.MomentumFamily": {"momentum": 0.0},
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_client(s: Any, setup: SetupInfo) -> None:
    needs: dict[str, Any] = {}
    for cls in reversed(type(s).__mro__):
        needs.update(CLIENT_REQUIREMENTS.get(_qualname(cls), {}))
    needs.update(getattr(s, "client_requires", None) or {})
    for key, value in needs.items():
        got = OmegaConf.select(setup.cfg, f"client.{key}")
        if got != value:
            _fail(f"client.{key}", f"must be {value} with {type(s).__name__} (got {got})")


def _threat_rounding(setup: SetupInfo) -> None:
    groups = OmegaConf.select(setup.cfg, "threat.groups") or []
    for i, g in enumerate(groups):
        frac = g.get("fraction")
        if frac is None or float(frac) <= 0:
            continue
        k = int(round(float(frac) * setup.num_clients))
        if k == 0:
            setup.warn(
                f"threat.groups[{i}].fraction: {frac} of num_clients={setup.num_clients} rounds to 0 "
                f"attackers: group '{g.get('name')}' has no clients in this run; raise num_clients or "
                f"the fraction, or list threat.groups[{i}].ids"
            )


def build_strategy(node: Any) -> Any:
    """Instantiate the strategy node; a failing constructor is a ConfigError naming the target."""
    from flwr.serverapp.strategy import Strategy
    from hydra.utils import instantiate

    from fedsim.config import locate

    target = node["_target_"]
    cls = locate(target)  # imports: checked by fedsim.config._check_target before
    if isinstance(cls, type) and not issubclass(cls, Strategy):
        _fail("strategy._target_", f"{target} is not a Flower strategy (a subclass of flwr.serverapp.strategy.Strategy)")
    try:
        obj = instantiate(node, _convert_="all")
    except ConfigError:
        raise
    except Exception as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        _fail("strategy", f"{target}(...) failed: {_one_line(err)}")
    if not isinstance(obj, Strategy):
        _fail("strategy._target_", f"{target} gave a {type(obj).__name__}, not a flwr.serverapp.strategy.Strategy")
    return obj


def _one_line(err: BaseException) -> str:
    inner = err.__cause__ or err
    lines = [ln for ln in str(inner).splitlines() if ln.strip()]
    return f"{type(inner).__name__}: {lines[-1] if lines else ''}"


def check_setup(cfg: DictConfig) -> SetupInfo:
    """Run every setup check for ``cfg``; raise ConfigError, return the info with its warnings."""
    from fedsim.participation import PARTICIPATION

    check_device(str(cfg.device))
    n = int(cfg.num_clients)
    active = PARTICIPATION[cfg.participation.name].round_sizes(cfg.participation, n)
    setup = SetupInfo(cfg, n, active)
    _threat_rounding(setup)
    if cfg.get("topology") is not None and "topology" not in cfg.strategy:
        _fail("topology", f"strategy {cfg.strategy['_target_']} takes no topology (use a decentralized strategy, e.g. strategy=gossip)")
    strategy = build_strategy(cfg.strategy)
    for cls in reversed(type(strategy).__mro__):  # base classes first: FedAvg's keys before Krum's
        check = CHECKS.get(_qualname(cls))
        if check is not None:
            check(strategy, setup)
    _check_client(strategy, setup)
    hook = getattr(strategy, "check_setup", None)
    if callable(hook):
        hook(setup)
    return setup
