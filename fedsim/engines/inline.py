"""The ``inline`` engine: one process, nodes run one after another. No Ray.

For tests, debugging and small runs. A client that raises becomes an error reply; a client
that runs past ``engine.client_timeout`` cannot be pre-empted in-process, so its (late) reply
is replaced by a timeout error, which keeps the round's outcome identical to the Ray engine's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.clientapp import ClientApp

from fedsim.client import make_client_app
from fedsim.engines.base import (
    CLIENT_EXCEPTION,
    CLIENT_TIMEOUT,
    LocalGrid,
    error_reply,
    set_server_identity,
    warm_up,
)
from fedsim.server import run_server


class InlineGrid(LocalGrid):
    """Hands each Message to the ClientApp with that node's Context, in this process."""

    def __init__(self, app: ClientApp, num_clients: int, client_timeout: float | None = None) -> None:
        super().__init__(num_clients)
        self.app = app
        self.client_timeout = client_timeout

    def deliver(self, msg: Message) -> Message:
        """Run the ClientApp for one message; errors and overruns become error replies.

        A failed call leaves the client's ``context.state`` as it was (as on the Ray engine,
        whose state comes back only with a successful reply): records the call replaced are
        put back. (A record mutated in place cannot be restored; fedsim's algorithms replace.)
        """
        ctx = self.contexts[msg.metadata.dst_node_id]
        before = dict(ctx.state.items())
        t0 = time.perf_counter()
        try:
            reply = self.app(msg, ctx)
            if self.client_timeout is not None and time.perf_counter() - t0 > self.client_timeout:
                reply = error_reply(msg, CLIENT_TIMEOUT, f"client ran past engine.client_timeout={self.client_timeout}s")
        except Exception as exc:  # a crashing client is reported, never fatal
            reply = error_reply(msg, CLIENT_EXCEPTION, exc)
        if reply.has_error():
            for key in [k for k in ctx.state if k not in before]:
                del ctx.state[key]
            for key, rec in before.items():
                ctx.state[key] = rec
        return reply

    def dispatch(self, messages: list[Message], timeout: float | None) -> dict[str, Message]:  # noqa: D102
        return {m.metadata.message_id: self.deliver(m) for m in messages}


def run(cfg: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
    """Run ``cfg`` in this process."""
    set_server_identity()
    warm_up(cfg)  # torch's lazy imports must not count against the first client's timeout
    grid = InlineGrid(make_client_app(cfg), cfg["num_clients"], cfg["engine"].get("client_timeout"))
    return run_server(grid, cfg, run_dir, engine="inline")
