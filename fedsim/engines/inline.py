"""The ``inline`` engine: one process, nodes run one after another. No Ray.

For tests, debugging and small runs. A client that raises becomes an error reply; a client
that runs past ``engine.client_timeout`` cannot be pre-empted in-process, so its (late) reply
is replaced by a timeout error, which keeps the round's outcome identical to the Ray engine's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedsim.client import make_client_app
from fedsim.engines.base import (
    CLIENT_EXCEPTION,
    CLIENT_TIMEOUT,
    error_reply,
    make_context,
    node_id_of,
    set_server_identity,
    stamp,
    warm_up,
)
from fedsim.server import run_server


class InlineGrid(Grid):
    """Hands each Message to the ClientApp with that node's Context, in this process."""

    def __init__(self, app: ClientApp, num_clients: int, client_timeout: float | None = None) -> None:
        self.app = app
        self.client_timeout = client_timeout
        self.contexts = {node_id_of(p): make_context(p, num_clients) for p in range(num_clients)}
        self._replies: dict[str, Message] = {}
        self._run = None

    def set_run(self, run):  # noqa: ANN001, D102
        self._run = run

    @property
    def run(self):  # noqa: D102
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def deliver(self, msg: Message) -> Message:
        """Run the ClientApp for one message; errors and overruns become error replies."""
        t0 = time.perf_counter()
        try:
            reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # a crashing client is reported, never fatal
            return error_reply(msg, CLIENT_EXCEPTION, exc)
        if self.client_timeout is not None and time.perf_counter() - t0 > self.client_timeout:
            return error_reply(msg, CLIENT_TIMEOUT, f"client ran past engine.client_timeout={self.client_timeout}s")
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        ids = []
        for msg in messages:
            mid = stamp(msg)
            self._replies[mid] = self.deliver(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:  # noqa: D102
        return self.pull_messages(self.push_messages(messages))


def run(cfg: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
    """Run ``cfg`` in this process."""
    set_server_identity()
    warm_up(cfg)  # torch's lazy imports must not count against the first client's timeout
    grid = InlineGrid(make_client_app(cfg), cfg["num_clients"], cfg["engine"].get("client_timeout"))
    return run_server(grid, cfg, run_dir, engine="inline")
