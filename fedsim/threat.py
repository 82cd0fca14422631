"""Who is malicious or unreliable: the ground truth, seeded, never visible to strategies.

A threat config (``threat/`` group) lists attacker groups::

    groups:
      - name: signflip            # label used in detection scores
        kind: malicious           # malicious | unreliable
        fraction: 0.125           # of num_clients (or: ids: [0, 10, 11])
        attack: {_target_: attacks.poisoning.SignFlip, scale: 1.0}

Assignment draws from a generator keyed by (seed, "threat"): groups with explicit ``ids``
take those, the rest take consecutive slices of one seeded permutation of the remaining ids.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from fedsim.seeding import np_rng


def _groups(threat_cfg: Any) -> list[Any]:
    if threat_cfg is None:
        return []
    return list(threat_cfg.get("groups", []) or [])


def validate(threat_cfg: Any, num_clients: int) -> None:
    """Check the threat config; raise ConfigError naming the key."""
    from fedsim.config import ConfigError

    total = 0
    for i, g in enumerate(_groups(threat_cfg)):
        key = f"threat.groups[{i}]"
        if "attack" not in g and g.get("kind", "malicious") != "benign":
            raise ConfigError(f"{key}.attack: missing")
        if g.get("kind", "malicious") not in ("malicious", "unreliable", "benign"):
            raise ConfigError(f"{key}.kind: must be malicious, unreliable or benign")
        has_ids, has_frac = g.get("ids") is not None, g.get("fraction") is not None
        if has_ids == has_frac:
            raise ConfigError(f"{key}: give exactly one of 'fraction' or 'ids'")
        if has_frac and not 0 <= float(g["fraction"]) <= 1:
            raise ConfigError(f"{key}.fraction: must be in [0, 1]")
        if has_ids and any(not 0 <= int(p) < num_clients for p in g["ids"]):
            raise ConfigError(f"{key}.ids: every id must be in [0, num_clients)")
        total += len(g["ids"]) if has_ids else int(round(float(g["fraction"]) * num_clients))
    if total > num_clients:
        raise ConfigError(f"threat.groups: {total} attackers but only {num_clients} clients")


def assign(threat_cfg: Any, num_clients: int, seed: int) -> dict[int, str]:
    """``{partition_id: group name}`` for every attacking/unreliable partition."""
    groups = _groups(threat_cfg)
    taken: dict[int, str] = {}
    for g in groups:
        if g.get("ids") is not None:
            for p in g["ids"]:
                taken[int(p)] = str(g["name"])
    free = [p for p in np_rng(seed, "threat").permutation(num_clients).tolist() if p not in taken]
    pos = 0
    for g in groups:
        if g.get("ids") is None:
            k = int(round(float(g["fraction"]) * num_clients))
            for p in free[pos : pos + k]:
                taken[int(p)] = str(g["name"])
            pos += k
    return dict(sorted(taken.items()))


def group_kinds(threat_cfg: Any) -> dict[str, str]:
    """``{group name: kind}``."""
    return {str(g["name"]): str(g.get("kind", "malicious")) for g in _groups(threat_cfg)}


def client_attack(threat_cfg: Any, pid: int, num_clients: int, seed: int):
    """The attack partition ``pid`` runs, or ``None`` if it is benign."""
    from hydra.utils import instantiate

    name = assign(threat_cfg, num_clients, seed).get(pid)
    if name is None:
        return None
    group = next(g for g in _groups(threat_cfg) if str(g["name"]) == name)
    attack_cfg = group.get("attack")
    if attack_cfg is None:
        return None
    if OmegaConf.is_config(attack_cfg):
        attack_cfg = OmegaConf.to_container(attack_cfg, resolve=True)
    return instantiate(attack_cfg, _convert_="all")


def server_plugins(cfg: Any, data: Any) -> tuple[list[Any], list[Any]]:
    """Reply hooks (colluding attacks) and round observers (detection scoring) for a run.

    Without attackers there are none.
    """
    if not _groups(cfg.get("threat")):
        return [], []
    return [], []
