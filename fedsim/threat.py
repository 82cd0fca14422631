"""Who is malicious or unreliable: the ground truth, seeded, never visible to strategies.

A threat config (``threat/`` group, schema :class:`fedsim.config.ThreatConfig`) lists groups::

    groups:
      - name: signflip            # label used in ground truth and detection scores
        kind: malicious           # malicious | unreliable | benign
        fraction: 0.125           # of num_clients (or: ids: [0, 10, 11])
        attack: {_target_: attacks.update.SignFlip, scale: 1.0}
        detect_as: [signflip]     # detector labels that identify this type (default: [name])
        schedule: {start: 1, every: 10}   # attack rounds (default: every round; see in_schedule)

Assignment draws from a generator keyed by (seed, "threat"): groups with explicit ``ids``
take those, the rest take consecutive slices of one seeded permutation of the remaining ids.

An ``attack`` is either a :class:`attacks.base.ClientAttack` (run by the client: data, hooks,
update) or a :class:`attacks.base.ReplyTransform` (colluding: the members train honestly and
:class:`ColludingHook` rewrites their replies from the benign ones before the strategy sees them).

:func:`server_plugins` gives the server that hook, the server halves of client attacks (model
replacement's boost), a backdoor-accuracy observer for attacks that plant a backdoor
(:mod:`fedsim.backdoor_eval`), and a :class:`DetectionScorer`, which writes
the ground truth into ``summary.json`` and scores any strategy exposing
``flagged() -> {node_id: label}``: per round precision / recall / F1 in ``metrics.jsonl``, a
final confusion table in ``summary.json``. Strategies get neither object.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict
from omegaconf import OmegaConf

from fedsim.seeding import np_rng

log = logging.getLogger("fedsim")

KINDS = ("malicious", "unreliable", "benign")
# Labels a detector gives to clients it keeps: they do not count as "flagged malicious".
KEEP_LABELS = frozenset({"unreliable", "benign"})


def _groups(threat_cfg: Any) -> list[Any]:
    if threat_cfg is None:
        return []
    return list(threat_cfg.get("groups", []) or [])


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def validate(threat_cfg: Any, num_clients: int) -> None:
    """Check the threat config; raise ConfigError naming the key."""
    from fedsim.config import ConfigError, _check_target

    total, names, explicit = 0, set(), set()
    for i, g in enumerate(_groups(threat_cfg)):
        key = f"threat.groups[{i}]"
        name, kind = g.get("name"), g.get("kind", "malicious")
        if not name:
            raise ConfigError(f"{key}.name: missing")
        if name in names:
            raise ConfigError(f"{key}.name: '{name}' used by two groups")
        names.add(name)
        if kind not in KINDS:
            raise ConfigError(f"{key}.kind: must be one of {KINDS} (got '{kind}')")
        if g.get("attack") is None and kind != "benign":
            raise ConfigError(f"{key}.attack: missing")
        has_ids, has_frac = g.get("ids") is not None, g.get("fraction") is not None
        if has_ids == has_frac:
            raise ConfigError(f"{key}: give exactly one of 'fraction' or 'ids'")
        if has_frac and not 0 <= float(g["fraction"]) <= 1:
            raise ConfigError(f"{key}.fraction: must be in [0, 1]")
        if has_ids:
            ids = [int(p) for p in g["ids"]]
            if any(not 0 <= p < num_clients for p in ids):
                raise ConfigError(f"{key}.ids: every id must be in [0, num_clients={num_clients})")
            if len(set(ids)) != len(ids) or explicit & set(ids):
                raise ConfigError(f"{key}.ids: an id appears twice")
            explicit |= set(ids)
        total += len(g["ids"]) if has_ids else int(round(float(g["fraction"]) * num_clients))
        if g.get("attack") is not None:
            _check_target(g["attack"], f"{key}.attack")
            _check_attack_type(g["attack"], f"{key}.attack", kind, _plain(g.get("schedule")))
        _validate_schedule(g, key)
    if total > num_clients:
        raise ConfigError(f"threat.groups: {total} attackers but only {num_clients} clients")


_DEFAULT_SCHEDULE = {"start": 1, "stop": None, "every": 1, "sample": False}


def _check_attack_type(node: Any, key: str, kind: str, schedule: Any = None) -> None:
    import inspect

    from attacks.base import ClientAttack, ReplyTransform
    from fedsim.config import ConfigError, locate

    cls = locate(node["_target_"])
    if not inspect.isclass(cls):  # a factory function: checked when instantiated
        return
    if not issubclass(cls, (ClientAttack, ReplyTransform)):
        raise ConfigError(f"{key}._target_: {cls.__name__} is neither a ClientAttack nor a ReplyTransform")
    if issubclass(cls, ReplyTransform) and kind != "malicious":
        raise ConfigError(f"{key}: a colluding ReplyTransform needs kind: malicious")
    if issubclass(cls, ReplyTransform) and schedule not in (None, {}, _DEFAULT_SCHEDULE):
        raise ConfigError(f"{key[: -len('.attack')]}.schedule: colluding ReplyTransform groups attack every round "
                          "(schedules apply to client attacks)")


_ASSIGNED: dict[str, dict[int, str]] = {}


def assign(threat_cfg: Any, num_clients: int, seed: int) -> dict[int, str]:
    """``{partition_id: group name}`` for every attacking/unreliable partition.

    Memoised per (config, N, seed): every client call of every round asks, and the answer
    never changes within a run.
    """
    groups = _groups(threat_cfg)
    plain = OmegaConf.to_container(threat_cfg, resolve=True) if OmegaConf.is_config(threat_cfg) else threat_cfg
    key = json.dumps([plain, num_clients, seed], sort_keys=True, default=str)
    if key not in _ASSIGNED:
        _ASSIGNED[key] = _assign(groups, num_clients, seed)
    return _ASSIGNED[key]


def _assign(groups: list[Any], num_clients: int, seed: int) -> dict[int, str]:
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


def group_labels(threat_cfg: Any) -> dict[str, list[str]]:
    """``{group name: detector labels that identify its type}`` (default: the name)."""
    return {str(g["name"]): [str(x) for x in (g.get("detect_as") or [g["name"]])] for g in _groups(threat_cfg)}


def _instantiate(attack_cfg: Any) -> Any:
    from hydra.utils import instantiate

    return instantiate(_plain(attack_cfg), _convert_="all")


def client_attack(threat_cfg: Any, pid: int, num_clients: int, seed: int, server_round: int | None = None):
    """The :class:`ClientAttack` partition ``pid`` runs, or ``None`` (benign, or a colluding
    member, which trains honestly and is rewritten on the server side).

    With ``server_round``, a member outside its group's ``schedule`` trains honestly (``None``),
    and attack parts with a ``bind(member_index, attack_index)`` method learn their rank among
    the group's members and how many of their attack rounds came before this one (DBA pieces).
    """
    from attacks.base import ClientAttack

    if not _groups(threat_cfg):  # no threat model: skip drawing the assignment on every call
        return None
    truth = assign(threat_cfg, num_clients, seed)
    name = truth.get(pid)
    if name is None:
        return None
    group = next(g for g in _groups(threat_cfg) if str(g["name"]) == name)
    if group.get("attack") is None:
        return None
    if server_round is not None and not in_schedule(group, server_round):
        return None
    attack = _instantiate(group["attack"])
    if not isinstance(attack, ClientAttack):
        return None
    if server_round is not None:
        members = sorted(p for p, g in truth.items() if g == name)
        done = sum(in_schedule(group, r) for r in range(1, server_round))
        for part in attack.parts():
            if callable(getattr(part, "bind", None)):
                part.bind(members.index(pid), done)
    return attack


# --------------------------------------------------------------------------------------------
# Attack schedules: which rounds a group attacks in
# --------------------------------------------------------------------------------------------
def _schedule(group: Any) -> dict[str, Any]:
    s = _plain(group.get("schedule")) or {}

    def get(key: str, default: Any) -> Any:
        return default if s.get(key) is None else s[key]

    return {"start": int(get("start", 1)), "stop": s.get("stop"), "every": int(get("every", 1)),
            "sample": bool(get("sample", False))}


def in_schedule(group: Any, server_round: int) -> bool:
    """Does the group attack in ``server_round``? Rounds ``start, start + every, ...`` up to
    ``stop`` (the paper's "attacker every 10th round" is start 1, every 10: (r - 1) % 10 == 0;
    a clean warm-up of R rounds is start R + 1)."""
    s = _schedule(group)
    r = int(server_round)
    return r >= s["start"] and (s["stop"] is None or r <= int(s["stop"])) and (r - s["start"]) % s["every"] == 0


def _validate_schedule(group: Any, key: str) -> None:
    from fedsim.config import ConfigError

    raw = _plain(group.get("schedule")) or {}
    unknown = set(raw) - {"start", "stop", "every", "sample"}
    if unknown:
        raise ConfigError(f"{key}.schedule.{sorted(unknown)[0]}: unknown key (start, stop, every, sample)")
    s = _schedule(group)
    if s["start"] < 1:
        raise ConfigError(f"{key}.schedule.start: must be >= 1")
    if s["every"] < 1:
        raise ConfigError(f"{key}.schedule.every: must be >= 1")
    if s["stop"] is not None and int(s["stop"]) < s["start"]:
        raise ConfigError(f"{key}.schedule.stop: must be >= start")


class ScheduledParticipation:
    """Participation wrapper for groups with ``schedule.sample: true`` (the paper's fixed-frequency
    mode): their members train exactly in their attack rounds. The base model's active set keeps
    its size: scheduled attackers take the place of seeded-random honest clients, and unscheduled
    members are replaced by seeded-random honest clients that were not active."""

    def __init__(self, base: Any, threat_cfg: Any, num_clients: int, seed: int) -> None:
        self.base, self.seed, self.n = base, seed, num_clients
        truth = assign(threat_cfg, num_clients, seed)
        self.groups = {str(g["name"]): g for g in _groups(threat_cfg) if _schedule(g)["sample"]}
        self.members = {p: truth[p] for p in truth if truth[p] in self.groups}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def active(self, server_round: int) -> list[int]:
        act = list(self.base.active(server_round))
        k = len(act)
        attackers = sorted(p for p, g in self.members.items() if in_schedule(self.groups[g], server_round))[:k]
        honest = [p for p in act if p not in self.members]
        rng = np_rng(self.seed, "participation", "attack-schedule", server_round)
        need = k - len(attackers)
        if len(honest) > need:
            honest = sorted(rng.choice(honest, size=need, replace=False).tolist())
        elif len(honest) < need:
            pool = [p for p in range(self.n) if p not in self.members and p not in honest]
            extra = rng.choice(pool, size=min(need - len(honest), len(pool)), replace=False).tolist()
            honest = honest + [int(p) for p in extra]
        return sorted(attackers + [int(p) for p in honest])


def wrap_participation(part: Any, cfg: Any) -> Any:
    """``part``, wrapped in :class:`ScheduledParticipation` when a group asks for it."""
    threat_cfg = cfg.get("threat")
    if not any(_schedule(g)["sample"] for g in _groups(threat_cfg)):
        return part
    return ScheduledParticipation(part, threat_cfg, int(cfg["num_clients"]), int(cfg["seed"]))


# --------------------------------------------------------------------------------------------
# Colluding attacks: a reply hook
# --------------------------------------------------------------------------------------------
def _float_keys(rec: ArrayRecord) -> list[str]:
    return [k for k, a in rec.items() if "float" in a.dtype]


def _vec(rec: ArrayRecord, keys: list[str]) -> np.ndarray:
    return np.concatenate([rec[k].numpy().astype(np.float64).ravel() for k in keys])


class ColludingHook:
    """Applies each colluding group's :class:`ReplyTransform` to its members' train replies.

    Updates are ``reply - sent global`` over every floating-point array. ``benign`` = the
    round's replies from partitions that are not in a malicious group. A transform whose
    output is not finite turns the reply into an error reply (never aggregated).
    """

    def __init__(self, transforms: dict[str, Any], assignment: dict[int, str], malicious: set[int], seed: int):
        self.transforms = transforms  # group name -> ReplyTransform
        self.assignment = assignment
        self.malicious = malicious
        self.seed = seed

    def on_train_replies(self, grid: Any, server_round: int, replies: list[Message]) -> list[Message]:
        from fedsim.grid import NONFINITE_CODE

        ok = [r for r in replies if not r.has_error() and r.has_content()]
        pids = {id(r): grid.pid(r.metadata.src_node_id) for r in ok}
        sent = {id(r): grid.sent_train[r.metadata.src_node_id].content.array_records["arrays"] for r in ok}
        upd: dict[int, np.ndarray] = {}
        for r in ok:
            rec = r.content.array_records["arrays"]
            keys = _float_keys(rec)
            upd[id(r)] = _vec(rec, keys) - _vec(sent[id(r)], keys)
        benign = [torch.from_numpy(upd[id(r)]) for r in ok if pids[id(r)] not in self.malicious]
        replaced: dict[int, Message] = {}
        for name, transform in self.transforms.items():
            members = [r for r in ok if self.assignment.get(pids[id(r)]) == name]
            if not members:
                continue
            rng = np_rng(self.seed, "collude", server_round, name)
            new = transform.apply(benign, [torch.from_numpy(upd[id(r)]) for r in members], rng)
            for r, vec in zip(members, new):
                vec = np.asarray(vec.detach().cpu().numpy() if isinstance(vec, torch.Tensor) else vec, dtype=np.float64)
                if not np.isfinite(vec).all():
                    st = grid.stats.get(server_round)
                    if st is not None:
                        st.replied, st.failed, st.nonfinite = st.replied - 1, st.failed + 1, st.nonfinite + 1
                        st.failures.append({"partition": pids[id(r)], "reason": "colluding update not finite; dropped"})
                    replaced[id(r)] = Message(Error(NONFINITE_CODE, "reply contains NaN or Inf values; dropped"),
                                              reply_to=grid.sent_train[r.metadata.src_node_id])
                    continue
                r.content = _with_update(r.content, sent[id(r)], vec)
        return [replaced.get(id(r), r) for r in replies]


def _with_update(content: RecordDict, global_rec: ArrayRecord, update: np.ndarray) -> RecordDict:
    """A copy of ``content`` whose ``arrays`` are ``global + update`` (float arrays only)."""
    rec = content.array_records["arrays"]
    out: dict[str, Array] = {}
    pos = 0
    for k, a in rec.items():
        arr = a.numpy()
        if "float" in a.dtype:
            g = global_rec[k].numpy().astype(np.float64)
            out[k] = Array((g + update[pos : pos + arr.size].reshape(arr.shape)).astype(arr.dtype))
            pos += arr.size
        else:
            out[k] = Array(arr.copy())
    new = RecordDict({k: v for k, v in content.items() if k != "arrays"})
    new["arrays"] = ArrayRecord(out)
    return new


# --------------------------------------------------------------------------------------------
# Detection scoring
# --------------------------------------------------------------------------------------------
def _prf(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    """Precision, recall, F1 (``None`` where the denominator is 0; F1 = 2tp / (2tp + fp + fn))."""
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
    }


def detection_scores(
    truth: dict[int, str],
    kinds: dict[str, str],
    labels: dict[str, list[str]],
    flags: dict[int, str],
    universe: Iterable[int],
) -> dict[str, Any]:
    """Score a detector's ``flags`` ``{pid: label}`` against the ``truth`` ``{pid: group}``.

    * overall: positives are members of ``malicious`` groups; a client counts as flagged when
      its label is not in :data:`KEEP_LABELS` (``unreliable`` / ``benign`` mean "kept");
    * per detector label ``L`` (every ``detect_as`` label, e.g. ``targeted`` for both label-flip
      groups): positives are members of groups listing ``L``, flagged = labelled ``L``;
    * per group: ``recall`` (labelled with one of its own labels) and ``caught`` (flagged
      malicious, any label), ``n`` its members in ``universe``.

    Only clients in ``universe`` (the round's participants) count.
    """
    uni = sorted(set(universe))
    pos = {p for p in uni if kinds.get(truth.get(p, ""), "benign") == "malicious"}
    pred = {p for p in uni if p in flags and flags[p] not in KEEP_LABELS}
    out: dict[str, Any] = {"tp": len(pos & pred), "fp": len(pred - pos), "fn": len(pos - pred)}
    out.update(_prf(out["tp"], out["fp"], out["fn"]))
    by_label: dict[str, dict[str, Any]] = {}
    for lab in sorted({x for ls in labels.values() for x in ls}):
        t = {p for p in uni if p in truth and lab in labels.get(truth[p], [])}
        f = {p for p in uni if flags.get(p) == lab}
        by_label[lab] = _prf(len(t & f), len(f - t), len(t - f))
    by_group: dict[str, dict[str, Any]] = {}
    for g in labels:
        members = [p for p in uni if truth.get(p) == g]
        n = len(members)
        hit = sum(flags.get(p) in labels[g] for p in members)
        caught = sum(p in pred for p in members)
        by_group[g] = {"n": n, "recall": hit / n if n else None, "caught": caught / n if n else None}
    out["by_label"], out["by_group"] = by_label, by_group
    return out


def flat_scores(scores: dict[str, Any], prefix: str = "det") -> dict[str, Any]:
    """The metrics.jsonl form: ``det_precision``, ``det_<label>_recall``, ``det_group_<g>_recall`` ..."""
    row = {f"{prefix}_{k}": scores[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")}
    for lab, s in scores["by_label"].items():
        for k, v in s.items():
            row[f"{prefix}_{lab}_{k}"] = v
    for g, s in scores["by_group"].items():
        row[f"{prefix}_group_{g}_recall"] = s["recall"]
        row[f"{prefix}_group_{g}_caught"] = s["caught"]
    return row


def confusion_table(truth: dict[int, str], flags: dict[int, str], universe: Iterable[int]) -> dict[str, dict[str, int]]:
    """``{true group or 'benign': {detector label or 'none': count}}``."""
    table: dict[str, dict[str, int]] = {}
    for p in sorted(set(universe)):
        row = table.setdefault(truth.get(p, "benign"), {})
        lab = flags.get(p, "none")
        row[lab] = row.get(lab, 0) + 1
    return table


class DetectionScorer:
    """Round observer: ground truth into the summary, detection scores per round.

    Scores only strategies exposing ``flagged() -> {node_id: label}``; nothing is added to the
    round records of the others.
    """

    def __init__(self, threat_cfg: Any, num_clients: int, seed: int) -> None:
        self.truth = assign(threat_cfg, num_clients, seed)
        self.kinds = group_kinds(threat_cfg)
        self.labels = group_labels(threat_cfg)
        self.num_clients = num_clients
        self.attacks = {str(g["name"]): _plain(g.get("attack")) for g in _groups(threat_cfg)}
        self.history: list[dict[str, Any]] = []

    def _flags(self, strategy: Any, grid: Any) -> dict[int, str] | None:
        fn = getattr(strategy, "flagged", None)
        if not callable(fn):
            return None
        return {grid.pid(n): str(lab) for n, lab in fn().items()}

    def on_round_end(self, server_round: int, strategy: Any, grid: Any) -> dict[str, Any]:
        flags = self._flags(strategy, grid)
        if flags is None:
            return {}
        st = grid.stats.get(server_round)
        universe = st.participants if st is not None and st.participants else range(self.num_clients)
        scores = detection_scores(self.truth, self.kinds, self.labels, flags, universe)
        self.history.append(scores)
        return {**flat_scores(scores), "flagged": {str(p): lab for p, lab in sorted(flags.items())}}

    def ground_truth(self) -> dict[str, Any]:
        groups = {
            g: {"kind": self.kinds[g], "detect_as": self.labels[g], "attack": self.attacks[g],
                "ids": [p for p, name in self.truth.items() if name == g]}
            for g in self.kinds
        }
        return {"assignment": {str(p): g for p, g in self.truth.items()}, "groups": groups}

    def on_finish(self, strategy: Any, grid: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"threat": self.ground_truth()}
        flags = self._flags(strategy, grid)
        if flags is not None:
            universe = range(self.num_clients)
            final = detection_scores(self.truth, self.kinds, self.labels, flags, universe)
            final["confusion"] = confusion_table(self.truth, flags, universe)
            out["detection"] = final
        return out


def server_plugins(cfg: Any, data: Any) -> tuple[list[Any], list[Any]]:
    """Reply hooks (colluding attacks) and round observers (ground truth, detection scoring).

    Without attacker groups there are none.
    """
    from attacks.base import ReplyTransform

    threat_cfg = cfg.get("threat")
    groups = _groups(threat_cfg)
    if not groups:
        return [], []
    n, seed = int(cfg["num_clients"]), int(cfg["seed"])
    truth = assign(threat_cfg, n, seed)
    kinds = group_kinds(threat_cfg)
    transforms = {}
    for g in groups:
        if g.get("attack") is not None:
            obj = _instantiate(g["attack"])
            if isinstance(obj, ReplyTransform):
                transforms[str(g["name"])] = obj
    hooks: list[Any] = []
    if transforms:
        malicious = {p for p, g in truth.items() if kinds[g] == "malicious"}
        hooks.append(ColludingHook(transforms, truth, malicious, seed))
    observers: list[Any] = [DetectionScorer(threat_cfg, n, seed)]
    backdoors: dict[str, Any] = {}
    for g in groups:  # attacks with a server half (model replacement's boost) and backdoors
        if g.get("attack") is None:
            continue
        obj = _instantiate(g["attack"])
        if isinstance(obj, ReplyTransform):
            continue
        name = str(g["name"])
        members = {p for p, gn in truth.items() if gn == name}
        for part in obj.parts():
            make = getattr(part, "server_hook", None)
            hook = make(members, lambda pid, r, _g=g: in_schedule(_g, r)) if callable(make) else None
            if hook is not None:
                hooks.append(hook)
            if callable(getattr(part, "backdoor_testset", None)) and name not in backdoors:
                backdoors[name] = part
    if backdoors:
        from fedsim.backdoor_eval import BackdoorObserver

        observers.append(BackdoorObserver(backdoors, data, cfg))
    return hooks, observers
