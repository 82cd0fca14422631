"""Checkpoints of a running experiment, and resuming from them (``output.checkpoint_every``,
``output.resume``; docs/sweeps.md).

A checkpoint after round r holds everything the rounds after r depend on:

* the global model (the ``ArrayRecord`` the strategy produced, bit for bit);
* the strategy's state: ``strategy.state_dict()`` where the strategy has one; otherwise the
  attributes its class lists in ``checkpoint_attrs`` (fedsim's strategies) or that
  :data:`FLOWER_STATE` names for Flower's stateful strategies (FedAvgM, FedAdam, ...); a
  strategy with none of these is refused unless it is in :data:`STATELESS`;
* every client's ``context.state`` (control variates, optimizer buffers, ...), held by the
  in-process engines on the driver;
* the harness: round records, per-round grid statistics, run-health state.

Participation needs nothing: every model draws round r's participants from a generator keyed
by (seed, r) (Markov recomputes its chain from round 0), and the per-round seeds of sampling,
attacks and client batches see the true round number on resume (see :func:`offset_strategy`).

Files (``run_dir/checkpoint/``): ``tensors-<r>.pt`` (``torch.save`` of tensors and plain
containers, loaded with ``weights_only=True``), then ``state.json`` naming it (written last,
atomically: the commit point); older tensor files are removed after.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.config import ConfigError
from fedsim.results import dumps, save_torch, write_text

log = logging.getLogger("fedsim")

FORMAT = 1
CHECKPOINT_DIR = "checkpoint"

#: Flower strategies that keep nothing across rounds (class names in flwr.serverapp.strategy).
STATELESS = {"FedAvg", "FedProx", "FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan"}
#: Flower strategies with server state, and the attributes that hold it.
FLOWER_STATE = {
    "FedAvgM": ("current_arrays", "momentum_vector"),
    "FedAdam": ("current_arrays", "m_t", "v_t"),
    "FedYogi": ("current_arrays", "m_t", "v_t"),
    "FedAdagrad": ("current_arrays", "m_t", "v_t"),
}


# --- which strategies can be checkpointed ----------------------------------------------------------
def _flower_name(cls: type) -> str | None:
    return cls.__name__ if cls.__module__.startswith("flwr.") else None


def state_attrs(cls: type) -> tuple[str, ...] | None:
    """Attributes to save for ``cls``; ``None`` when ``cls`` has a ``state_dict`` of its own."""
    if callable(getattr(cls, "state_dict", None)) and callable(getattr(cls, "load_state_dict", None)):
        return None
    if "checkpoint_attrs" in cls.__dict__:
        return tuple(cls.__dict__["checkpoint_attrs"])
    name = _flower_name(cls)
    if name in STATELESS:
        return ()
    if name in FLOWER_STATE:
        return FLOWER_STATE[name]
    raise ConfigError(
        f"output.checkpoint_every: strategy {cls.__module__}.{cls.__qualname__} does not say what state it keeps "
        f"(give it state_dict()/load_state_dict() or a class attribute checkpoint_attrs = (...); docs/sweeps.md), "
        f"so it cannot be checkpointed; set output.checkpoint_every=0"
    )


def check_strategy(target: str) -> None:
    """Refuse (ConfigError) a strategy class that cannot be checkpointed; imports only."""
    from hydra.utils import get_class

    state_attrs(get_class(target))


# --- a safe encoding of strategy state (tensors + plain containers) -----------------------------
def _record_bytes(rec: ArrayRecord | ConfigRecord | MetricRecord) -> torch.Tensor:
    from flwr.common.serde import recorddict_to_proto

    data = recorddict_to_proto(RecordDict({"r": rec})).SerializeToString()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)


def _record_from(t: torch.Tensor) -> Any:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(t.numpy().tobytes())
    return recorddict_from_proto(proto)["r"]


def encode(obj: Any) -> Any:
    """``obj`` as tensors, str/int/float/bool/None, lists and dicts (what weights_only loads).

    numpy arrays, sets, tuples, deques, Flower records, dataclasses and plain objects are
    tagged so :func:`decode` rebuilds them exactly (arrays keep dtype and bytes).
    """
    if isinstance(obj, np.generic):  # before float: np.float64 is a float subclass
        return {"__np_scalar__": encode(np.asarray(obj))}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(obj, copy=True, order="C")) if obj.dtype != object else None,
                "dtype": str(obj.dtype)}
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, (ArrayRecord, ConfigRecord, MetricRecord)):
        return {"__record__": _record_bytes(obj)}
    if isinstance(obj, collections.deque):
        return {"__deque__": [encode(v) for v in obj], "maxlen": obj.maxlen}
    if isinstance(obj, (set, frozenset)):
        return {"__set__": [encode(v) for v in sorted(obj, key=repr)]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v) for v in obj]}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {"__dict__": [[encode(k), encode(v)] for k, v in obj.items()]}
    if dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        cls = type(obj)
        return {"__object__": f"{cls.__module__}:{cls.__qualname__}", "attrs": encode(dict(vars(obj)))}
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__}")


def decode(obj: Any, allowed_modules: set[str]) -> Any:
    """Inverse of :func:`encode`; objects only of classes defined in ``allowed_modules``."""
    if isinstance(obj, list):
        return [decode(v, allowed_modules) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__ndarray__" in obj:
        return obj["__ndarray__"].numpy().astype(obj["dtype"], copy=True)
    if "__np_scalar__" in obj:
        return decode(obj["__np_scalar__"], allowed_modules)[()]
    if "__record__" in obj:
        return _record_from(obj["__record__"])
    if "__deque__" in obj:
        return collections.deque([decode(v, allowed_modules) for v in obj["__deque__"]], maxlen=obj["maxlen"])
    if "__set__" in obj:
        return {decode(v, allowed_modules) for v in obj["__set__"]}
    if "__tuple__" in obj:
        return tuple(decode(v, allowed_modules) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {decode(k, allowed_modules): decode(v, allowed_modules) for k, v in obj["__dict__"]}
    if "__object__" in obj:
        mod, qual = obj["__object__"].split(":")
        if mod not in allowed_modules:
            raise ValueError(f"checkpoint names class {mod}:{qual} outside the strategy's modules")
        cls: Any = importlib.import_module(mod)
        for part in qual.split("."):
            cls = getattr(cls, part)
        inst = cls.__new__(cls)
        inst.__dict__.update(decode(obj["attrs"], allowed_modules))
        return inst
    raise ValueError(f"unknown checkpoint entry with keys {sorted(obj)}")


def strategy_state(strategy: Any) -> Any:
    attrs = state_attrs(type(strategy))
    if attrs is None:
        return {"state_dict": encode(strategy.state_dict())}
    return {"attrs": encode({a: getattr(strategy, a) for a in attrs})}


def load_strategy_state(strategy: Any, saved: Any) -> None:
    allowed = {c.__module__ for c in type(strategy).__mro__}
    if "state_dict" in saved:
        strategy.load_state_dict(decode(saved["state_dict"], allowed))
        return
    for name, value in decode(saved["attrs"], allowed).items():
        setattr(strategy, name, value)


# --- client states -----------------------------------------------------------------------------------
def contexts_of(grid: Any) -> dict[int, Any] | None:
    """The engine's node Contexts keyed by node id (in-process engines), else ``None``."""
    return getattr(grid, "contexts", None)


def encode_state(state: RecordDict) -> torch.Tensor:
    from flwr.common.serde import recorddict_to_proto

    data = recorddict_to_proto(state).SerializeToString()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)


def decode_state(t: torch.Tensor) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(t.numpy().tobytes())
    return recorddict_from_proto(proto)


# --- save / load -------------------------------------------------------------------------------------
def save(
    run_dir: Path,
    server_round: int,
    arrays: ArrayRecord,
    strategy: Any,
    client_states: dict[int, RecordDict],
    harness: dict[str, Any],
) -> None:
    """Write the checkpoint after ``server_round`` (atomic; ``state.json`` last)."""
    d = Path(run_dir) / CHECKPOINT_DIR
    d.mkdir(parents=True, exist_ok=True)
    name = f"tensors-{server_round}.pt"
    save_torch(
        d / name,
        {
            "model": _record_bytes(arrays),
            "strategy": strategy_state(strategy),
            "clients": {int(pid): encode_state(st) for pid, st in client_states.items()},
        },
    )
    write_text(d / "state.json", dumps({"format": FORMAT, "round": server_round, "tensors": name, **harness}))
    for old in d.glob("tensors-*.pt"):
        if old.name != name:
            old.unlink(missing_ok=True)
    log.info("checkpoint after round %d: %s", server_round, d)


def load(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state.json, tensors)`` of the checkpoint in ``run_dir`` (tensors loaded weights_only)."""
    d = Path(run_dir) / CHECKPOINT_DIR
    state = json.loads((d / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ConfigError(f"output.resume: {d} has checkpoint format {state.get('format')}, expected {FORMAT}")
    tensors = torch.load(d / state["tensors"], weights_only=True)
    return state, tensors


def remove(run_dir: Path) -> None:
    """Delete the checkpoint of a finished run (its ``summary.json`` now marks it complete)."""
    import shutil

    shutil.rmtree(Path(run_dir) / CHECKPOINT_DIR, ignore_errors=True)


def model_of(tensors: dict[str, Any]) -> ArrayRecord:
    return _record_from(tensors["model"])


# --- starting at round r -----------------------------------------------------------------------------
class offset_strategy:  # noqa: N801 (used like a function)
    """A view of ``strategy`` whose round numbers are shifted by ``offset``.

    Flower's ``Strategy.start`` always counts rounds from 1. Resuming after round r runs the
    strategy's own ``start`` on this view with ``num_rounds = rounds - r``: every round number
    ``start`` passes on (to ``configure_*``/``aggregate_*`` and ``evaluate_fn``) is ``+ r``,
    so seeds derived from the round see the true round. Everything else is the strategy's.
    """

    _ROUND_METHODS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")

    def __init__(self, strategy: Any, offset: int) -> None:
        object.__setattr__(self, "_s", strategy)
        object.__setattr__(self, "_off", int(offset))

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._s, name)
        if name in self._ROUND_METHODS:
            return lambda server_round, *a, **k: attr(server_round + self._off, *a, **k)
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._s, name, value)

    def start(self, **kwargs: Any) -> Any:
        fn = kwargs.get("evaluate_fn")
        if fn is not None:
            kwargs["evaluate_fn"] = lambda server_round, arrays: fn(server_round + self._off, arrays)
        return type(self._s).start(self, **kwargs)
