"""Shared plumbing for fedsim's strategies, so each family is a pure function on tensors.

:class:`UpdateStrategy` turns a round's replies into flattened updates
``Delta_i = x_i - x`` (one row per client, in partition order) and asks the subclass for
the new global vector via :meth:`UpdateStrategy.aggregate_updates`. It also:

* trains every node the harness made active this round (participation decides who trains;
  no unseeded sampling);
* keeps the current global model, so updates can be formed;
* drops replies whose update is not finite (the grid already does this; this is the second
  line of defense for strategies used with other grids) and reports them;
* knows ``N`` (all registered nodes) and the node -> partition map through
  :meth:`bind_harness`, never the ground truth of who is malicious.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

log = logging.getLogger("fedsim")


# state_dict entries that are buffers, not trainable parameters (BatchNorm)
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

def flatten_record(rec: ArrayRecord) -> np.ndarray:
    """All floating-point arrays of ``rec`` concatenated (float64 for stable sums)."""
    return np.concatenate([a.numpy().astype(np.float64).ravel() for a in rec.values() if _is_float(a)])


def unflatten_like(vec: np.ndarray, template: ArrayRecord) -> ArrayRecord:
    """Inverse of :func:`flatten_record`: non-float arrays are copied from ``template``."""
    out: dict[str, Array] = {}
    pos = 0
    for key, arr in template.items():
        a = arr.numpy()
        if _is_float(arr):
            out[key] = Array(vec[pos : pos + a.size].reshape(a.shape).astype(a.dtype))
            pos += a.size
        else:
            out[key] = Array(a.copy())
    if pos != vec.size:
        raise ValueError(f"vector has {vec.size} entries, template needs {pos}")
    return ArrayRecord(out)


def _is_float(arr: Array) -> bool:
    return "float" in arr.dtype


@dataclass
class RoundUpdates:
    """One round's valid replies as matrices (rows in partition order)."""

    node_ids: list[int]
    updates: np.ndarray  # [n, d]: x_i - x
    num_examples: np.ndarray  # [n]
    replies: list[Message]  # the matching reply messages (extra records live here)


class UpdateStrategy(FedAvg):
    """Base for strategies that aggregate model updates.

    Subclasses implement ``aggregate_updates(server_round, ru) -> new global vector`` and may
    override ``extra_train_content(server_round, node_id) -> RecordDict entries`` to send
    more arrays (a momentum direction, control variates).
    """

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("fraction_evaluate", 0.0)
        kwargs.setdefault("min_train_nodes", 0)
        kwargs.setdefault("min_evaluate_nodes", 0)
        kwargs.setdefault("min_available_nodes", 0)
        super().__init__(**kwargs)
        self.global_arrays: ArrayRecord | None = None
        self.global_vec: np.ndarray | None = None
        self.all_nodes: list[int] = []
        self.node_to_pid: dict[int, int] = {}
        self.dropped: dict[int, list[int]] = {}

    # --- harness binding --------------------------------------------------------------
    def bind_harness(self, grid) -> None:  # noqa: ANN001
        """Called once by fedsim's server with its grid: learn N and node -> partition."""
        self.all_nodes = list(grid.all_node_ids())
        self.node_to_pid = {n: grid.pid(n) for n in self.all_nodes}
        self.harness = grid

    @property
    def num_clients(self) -> int:
        return len(self.all_nodes)

    # --- train ----------------------------------------------------------------------------
    def extra_train_content(self, server_round: int, node_id: int) -> dict[str, ArrayRecord | ConfigRecord]:
        """Records added to one node's train message besides the model and config."""
        return {}

    def train_config_extra(self, server_round: int) -> dict[str, object]:
        """Entries added to the train ConfigRecord (e.g. ``local-algorithm``)."""
        return {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send the model (and any extras) to every node active this round."""
        self.global_arrays = arrays
        self.global_vec = flatten_record(arrays)
        if self.fraction_train == 0.0:
            return []
        config["server-round"] = server_round
        for k, v in self.train_config_extra(server_round).items():
            config[k] = v
        msgs = []
        for node in grid.get_node_ids():
            content = {self.arrayrecord_key: arrays, self.configrecord_key: config}
            content.update(self.extra_train_content(server_round, node))
            msgs.append(Message(RecordDict(content), dst_node_id=node, message_type=MessageType.TRAIN))
        return msgs

    def param_mask(self) -> np.ndarray:
        """Positions of trainable parameters in the flattened update vectors (the float entries,
        without BatchNorm buffers): defenses that score or clip parameters only use it."""
        assert self.global_arrays is not None, "param_mask() needs the round's global model"
        parts = [np.full(int(np.prod(a.shape)), not k.endswith(BUFFER_SUFFIXES))
                 for k, a in self.global_arrays.items() if "float" in a.dtype]
        return np.concatenate(parts)

    def collect(self, server_round: int, replies: Iterable[Message]) -> RoundUpdates:
        """Valid, finite replies as a :class:`RoundUpdates` (partition order)."""
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        valid.sort(key=lambda m: self.node_to_pid.get(m.metadata.src_node_id, m.metadata.src_node_id))
        ids, rows, ns, keep = [], [], [], []
        for m in valid:
            vec = flatten_record(m.content.array_records[self.arrayrecord_key]) - self.global_vec
            if not np.isfinite(vec).all():
                self.dropped.setdefault(server_round, []).append(m.metadata.src_node_id)
                log.warning("round %d: dropping non-finite update from node %d", server_round, m.metadata.src_node_id)
                continue
            ids.append(m.metadata.src_node_id)
            rows.append(vec)
            metrics = m.content.metric_records.get("metrics", MetricRecord())
            ns.append(float(metrics.get(self.weighted_by_key, 1.0)))
            keep.append(m)
        d = 0 if self.global_vec is None else self.global_vec.size
        updates = np.stack(rows) if rows else np.zeros((0, d))
        return RoundUpdates(ids, updates, np.asarray(ns, dtype=np.float64), keep)

    @abstractmethod
    def aggregate_updates(self, server_round: int, ru: RoundUpdates) -> np.ndarray | None:
        """New global vector from the round's updates (``None`` keeps the model)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Form updates, apply the subclass's rule, return the new global model."""
        ru = self.collect(server_round, replies)
        new_vec = self.aggregate_updates(server_round, ru)
        if new_vec is None or self.global_arrays is None:
            return None, None
        metrics = self.train_metrics_aggr_fn([m.content for m in ru.replies], self.weighted_by_key) if ru.replies else None
        return unflatten_like(new_vec, self.global_arrays), metrics


def weighted_mean(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i w_i u_i / sum_i w_i (FedAvg's rule, McMahan et al. 2017, Alg. 1)."""
    w = np.asarray(weights, dtype=np.float64)
    return (w[:, None] * updates).sum(0) / w.sum()
