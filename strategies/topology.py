"""Seeded communication graphs for gossip learning, built with networkx.

Nodes are partition ids 0..N-1. ``build_topology(cfg, n, seed)`` returns a :class:`Topology`:
the neighbour lists (undirected: a node pushes its model to, and receives from, each neighbour)
and, for ``star``, a *virtual* centre run by the strategy (it does not train; it averages what
the leaves pushed and sends the average back, which leaves adopt with beta = 0: server FL).

=================  ==========================================================================
``name``           graph (keys)
=================  ==========================================================================
``ring``           cycle 0-1-...-(N-1)-0
``random_regular`` ``nx.random_regular_graph(degree, N)`` (the authors' GL set-up: degree 8,
                   N = 50); redrawn (next seed) while disconnected, up to ``max_tries``
``erdos_renyi``    G(N, p); a disconnected draw is refused (``connect: refuse``, default) or
                   redrawn with the next seed until connected (``connect: redraw``)
``small_world``    ``nx.connected_watts_strogatz_graph(N, k, p)`` (connected by construction)
``complete``       every pair
``star``           N leaves around a virtual centre (``nx.star_graph``'s shape, centre = server)
=================  ==========================================================================

Every draw uses a seed derived from (run seed, "topology", attempt), so the graph depends only on
the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx

from fedsim.seeding import derive_seed

__all__ = ["TOPOLOGIES", "Topology", "build_topology", "check_topology"]

TOPOLOGIES: dict[str, tuple[str, ...]] = {
    "ring": (),
    "random_regular": ("degree", "max_tries"),
    "erdos_renyi": ("p", "connect", "max_tries"),
    "small_world": ("k", "p", "max_tries"),
    "complete": (),
    "star": (),
}
DEFAULTS: dict[str, Any] = {"degree": 8, "p": 0.1, "k": 4, "connect": "refuse", "max_tries": 100}


@dataclass
class Topology:
    """Who talks to whom. ``neighbors[i]`` is sorted; ``star`` means a virtual centre."""

    name: str
    neighbors: dict[int, list[int]]
    star: bool = False
    draws: int = 1  # graphs drawn (> 1 when a disconnected draw was redrawn)

    def degree_stats(self) -> tuple[float, int, int]:
        """(mean, min, max) degree."""
        d = [len(v) for v in self.neighbors.values()]
        return sum(d) / max(len(d), 1), min(d, default=0), max(d, default=0)


def _key(cfg: Mapping[str, Any], key: str) -> Any:
    return cfg.get(key, DEFAULTS[key]) if cfg.get(key) is not None else DEFAULTS[key]


def check_topology(cfg: Mapping[str, Any], n: int, where: str = "strategy.topology") -> None:
    """Raise ``ValueError`` naming the first bad key (no graph is drawn)."""
    name = cfg.get("name")
    if name not in TOPOLOGIES:
        raise ValueError(f"{where}.name: '{name}' is not one of {sorted(TOPOLOGIES)}")
    allowed = set(TOPOLOGIES[name]) | {"name"}
    for key, value in cfg.items():
        if key not in allowed and value is not None:
            raise ValueError(f"{where}.{key}: not used by topology '{name}' (it takes {sorted(allowed)})")
    if n < 2:
        raise ValueError(f"num_clients: a gossip topology needs at least 2 nodes (got {n})")
    if name == "random_regular":
        d = int(_key(cfg, "degree"))
        if not 1 <= d < n or (d * n) % 2:
            raise ValueError(f"{where}.degree: need 1 <= degree < N and degree*N even (got degree={d}, N={n})")
    if name == "erdos_renyi":
        p = float(_key(cfg, "p"))
        if not 0 < p <= 1:
            raise ValueError(f"{where}.p: must be in (0, 1] (got {p})")
        if _key(cfg, "connect") not in ("refuse", "redraw"):
            raise ValueError(f"{where}.connect: '{cfg.get('connect')}' is not one of ['redraw', 'refuse']")
    if name == "small_world":
        k, p = int(_key(cfg, "k")), float(_key(cfg, "p"))
        if not 2 <= k < n:
            raise ValueError(f"{where}.k: need 2 <= k < N (got k={k}, N={n})")
        if not 0 <= p <= 1:
            raise ValueError(f"{where}.p: must be in [0, 1] (got {p})")
    if "max_tries" in TOPOLOGIES[name] and int(_key(cfg, "max_tries")) < 1:
        raise ValueError(f"{where}.max_tries: must be >= 1")


def _as_topology(name: str, g: nx.Graph, draws: int) -> Topology:
    return Topology(name, {int(i): sorted(int(j) for j in g.neighbors(i)) for i in sorted(g.nodes)}, draws=draws)


def build_topology(cfg: Mapping[str, Any], n: int, seed: int) -> Topology:
    """The seeded graph ``cfg`` describes over ``n`` nodes (see the module docstring)."""
    check_topology(cfg, n)
    name = str(cfg["name"])
    if name == "star":
        return Topology(name, {i: [] for i in range(n)}, star=True)
    if name == "ring":
        return _as_topology(name, nx.cycle_graph(n), 1)
    if name == "complete":
        return _as_topology(name, nx.complete_graph(n), 1)
    tries = int(_key(cfg, "max_tries"))
    if name == "small_world":
        k, p = int(_key(cfg, "k")), float(_key(cfg, "p"))
        g = nx.connected_watts_strogatz_graph(n, k, p, tries=tries, seed=derive_seed(seed, "topology", 0) % 2**32)
        return _as_topology(name, g, 1)
    for attempt in range(tries):
        s = derive_seed(seed, "topology", attempt) % 2**32
        if name == "random_regular":
            g = nx.random_regular_graph(int(_key(cfg, "degree")), n, seed=s)
        else:
            g = nx.gnp_random_graph(n, float(_key(cfg, "p")), seed=s)
        if nx.is_connected(g):
            return _as_topology(name, g, attempt + 1)
        if name == "erdos_renyi" and _key(cfg, "connect") == "refuse":
            raise ValueError(
                f"strategy.topology: the Erdos-Renyi draw G({n}, {float(_key(cfg, 'p'))}) with this seed is "
                "disconnected; raise topology.p or set topology.connect=redraw"
            )
    raise ValueError(f"strategy.topology: no connected {name} graph in {tries} draws (raise topology.max_tries)")
