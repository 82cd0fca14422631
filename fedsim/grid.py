"""FedsimGrid: the harness's view of any engine's Grid.

Every engine supplies a base :class:`flwr.serverapp.Grid` that delivers Messages. The strategy
talks to this wrapper instead, which adds what a simulation framework needs and Flower's grids
lack:

* **participation**: ``get_node_ids()`` returns only the nodes the participation model made
  active this round, so any strategy's sampler samples among them (set its fraction to 1.0 to
  let participation alone decide); Python's ``random`` is also re-seeded per round so Flower's
  own unseeded sampler becomes reproducible;
* **node -> partition map**: learned once with a ``query`` message, so node ids may be anything
  (Flower's runtime draws random ones);
* **order**: replies come back sorted by partition id, whatever order workers finished in, so
  aggregation sums in the same order on every engine;
* **safety**: a reply carrying NaN/Inf arrays is turned into an error reply (reported, never
  averaged); a missing reply counts as failed;
* **accounting**: bytes down/up, sampled/replied/failed per round;
* **reply hooks**: server-side transforms and observers (colluding attacks, gradient
  inversion) see the train replies before the strategy does;
* **no endless wait for nodes**: a round's active nodes are fixed, so a strategy that keeps
  polling ``get_node_ids()`` for more (Flower's ``sample_nodes`` loop, when ``min_*_nodes``
  exceeds what participation made active) would wait forever; after ``min(timeout,
  NODE_WAIT_S)`` seconds of polling without sending anything it gets a :class:`NodeWaitError`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim.arrays import to_numpy
from fedsim.config import ConfigError
from fedsim.participation import Participation
from fedsim.seeding import derive_seed

log = logging.getLogger("fedsim")

NONFINITE_CODE = 900  # error code of a reply dropped for NaN/Inf arrays
NODE_WAIT_S = 3.0  # polling get_node_ids() this long without sending = waiting for nodes that cannot come


class NodeWaitError(ConfigError):
    """The strategy waits for more nodes than participation made active this round."""


class ReplyHook(Protocol):
    """Sees (and may replace) the round's train replies before the strategy does."""

    def on_train_replies(self, grid: FedsimGrid, server_round: int, replies: list[Message]) -> list[Message]: ...


def record_bytes(content: RecordDict | None) -> int:
    """Bytes of all arrays in a RecordDict (what travels, ignoring small configs)."""
    if content is None:
        return 0
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())


def is_finite(content: RecordDict) -> bool:
    """True when every floating-point array in ``content`` is finite."""
    for rec in content.array_records.values():
        for arr in rec.values():
            if "float" in arr.dtype or "complex" in arr.dtype:
                if not np.isfinite(to_numpy(arr, copy=False)).all():
                    return False
    return True


@dataclass
class RoundStats:
    sampled: int = 0
    replied: int = 0
    failed: int = 0
    nonfinite: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    train_loss: float | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)


class FedsimGrid(Grid):
    """Wraps an engine's base grid; see the module docstring."""

    def __init__(
        self,
        base: Grid,
        participation: Participation,
        seed: int,
        hooks: list[ReplyHook] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.base = base
        self.participation = participation
        self.seed = seed
        self.hooks = list(hooks or [])
        self.timeout = timeout
        self.server_round = 0
        self.node_to_pid: dict[int, int] = {}
        self.pid_to_node: dict[int, int] = {}
        self._active: list[int] = []
        self.stats: dict[int, RoundStats] = {}
        self.sent_train: dict[int, Message] = {}  # this round's train messages by node (for reply hooks)
        self.node_wait = NODE_WAIT_S if timeout is None else min(float(timeout), NODE_WAIT_S)
        self._polls: list[float] = []  # times of get_node_ids() calls since the last send

    # -- delegation -------------------------------------------------------------------
    def set_run(self, run):  # noqa: ANN001, D102
        self.base.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self.base.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return self.base.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        self._polls.clear()
        return self.base.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.base.pull_messages(message_ids)

    # -- nodes and participation -------------------------------------------------------
    def discover(self) -> None:
        """Learn which partition each node holds (one ``query`` message per node)."""
        nodes = sorted(self.base.get_node_ids())
        msgs = [Message(RecordDict({"info": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for reply in self.base.send_and_receive(msgs, timeout=self.timeout):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed the partition query: {reply.error.reason}")
            pid = int(reply.content.config_records["info"]["partition-id"])
            self.node_to_pid[reply.metadata.src_node_id] = pid
        self.pid_to_node = {p: n for n, p in self.node_to_pid.items()}
        if len(self.pid_to_node) != len(nodes):
            raise RuntimeError(f"{len(nodes)} nodes but {len(self.pid_to_node)} distinct partitions answered")

    def begin_round(self, server_round: int) -> None:
        """Fix this round's participants (and seed Flower's sampler)."""
        self.server_round = server_round
        random.seed(derive_seed(self.seed, "flower-sampler", server_round))
        active = self.participation.active(server_round)
        self._active = [p for p in active if p in self.pid_to_node]
        self.stats[server_round] = RoundStats(participants=list(self._active))
        self._polls.clear()

    def get_node_ids(self) -> Iterable[int]:
        """The nodes active this round, in partition order.

        Raises :class:`NodeWaitError` when the strategy has polled for ``node_wait`` seconds
        (at least three calls) without sending anything: it is waiting for nodes, and the
        round's active set cannot grow.
        """
        now = time.monotonic()
        self._polls.append(now)
        if len(self._polls) >= 3 and now - self._polls[0] >= self.node_wait:
            self._polls.clear()
            raise NodeWaitError(
                f"strategy: round {self.server_round}: the strategy kept waiting for more nodes than the "
                f"{len(self._active)} that participation made active (a round's active clients are fixed, "
                "so the wait could never end); lower strategy.min_train_nodes / strategy.min_available_nodes, "
                "keep strategy.fraction_train <= 1, or raise participation.fraction / participation.min_clients"
            )
        return [self.pid_to_node[p] for p in self._active]

    def all_node_ids(self) -> list[int]:
        return [self.pid_to_node[p] for p in sorted(self.pid_to_node)]

    def pid(self, node_id: int) -> int:
        return self.node_to_pid[node_id]

    # -- delivery ------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver, then check, order, account and hook the replies."""
        messages = list(messages)
        self._polls.clear()
        if not messages:
            return []
        is_train = messages[0].metadata.message_type.startswith(MessageType.TRAIN)
        st = self.stats.setdefault(self.server_round, RoundStats())
        if is_train:
            self.sent_train = {m.metadata.dst_node_id: m for m in messages}
            st.sampled += len(messages)
            st.bytes_down += sum(record_bytes(m.content) for m in messages)
        replies = list(self.base.send_and_receive(messages, timeout=timeout if timeout is not None else self.timeout))
        answered = {r.metadata.src_node_id for r in replies}
        out: list[Message] = []
        for r in replies:
            if not r.has_error() and r.has_content() and not is_finite(r.content):
                r = Message(Error(NONFINITE_CODE, "reply contains NaN or Inf values; dropped"), reply_to=_find(messages, r))
            out.append(r)
        # partition order before anything sums over replies: arrival order differs between engines
        out.sort(key=lambda r: self.node_to_pid.get(r.metadata.src_node_id, -1))
        if is_train:
            for m in messages:
                if m.metadata.dst_node_id not in answered:
                    st.failures.append({"partition": self.pid(m.metadata.dst_node_id), "reason": "no reply (timeout)"})
                    st.failed += 1
            losses, weights = [], []
            for r in out:
                pid = self.pid(r.metadata.src_node_id)
                if r.has_error():
                    st.failed += 1
                    st.nonfinite += int(r.error.code == NONFINITE_CODE)
                    st.failures.append({"partition": pid, "reason": str(r.error.reason)[:500]})
                    log.warning("round %d: client (partition %d) failed: %s", self.server_round, pid, _last_line(r.error.reason))
                    continue
                st.replied += 1
                st.bytes_up += record_bytes(r.content)
                m = r.content.metric_records.get("metrics")
                if m is not None and "train_loss" in m:
                    losses.append(float(m["train_loss"]))
                    weights.append(float(m.get("num-examples", 1)))
            if losses:
                st.train_loss = float(np.average(losses, weights=weights))
            for hook in self.hooks:
                out = hook.on_train_replies(self, self.server_round, out)
        return out


def _last_line(reason: str | None) -> str:
    """The last line of an error reason (the exception), for one-line log messages."""
    lines = str(reason or "").strip().splitlines()
    return lines[-1] if lines else "unknown error"


def _find(messages: list[Message], reply: Message) -> Message:
    """The sent message a reply answers."""
    for m in messages:
        if m.metadata.dst_node_id == reply.metadata.src_node_id:
            return m
    raise KeyError(reply.metadata.src_node_id)
