"""``engine=ray engine.batched=true``: the batched trainer inside each Ray actor.

A round's train Messages are split, in partition order, into one contiguous chunk per actor;
each actor trains its chunk with :func:`fedsim.batched.train_batch` (chunks of at most
``engine.max_batch`` clients per vmap call, on the actor's GPU when it has one) and sends back
the replies and the clients' updated ``context.state``. Contexts live on the driver, in
:class:`~fedsim.engines.base.LocalGrid`'s ``contexts`` dict, as for the per-client ray engine.
Other messages (query, evaluate) go through the per-client dispatch of :class:`RayGrid`.

Unsupported settings are refused on the driver before round 1 (model, attacks,
``engine.client_timeout``) and before the first train call (local algorithms); see
:mod:`fedsim.batched`. An actor that dies fails its chunk's clients (error replies) and is
replaced at the next dispatch.
"""

from __future__ import annotations

from typing import Any

import ray
from flwr.app import Context, Message, MessageType, RecordDict

from fedsim.engines.base import CLIENT_EXCEPTION, CLIENT_TIMEOUT, error_reply
from fedsim.engines.ray import ACTOR_DIED, ClientActor, RayGrid


class BatchedClientActor(ClientActor):
    """A client actor that can also train a list of train Messages as one batch."""

    def __init__(self, cfg: dict[str, Any], num_threads: int, data: Any = None) -> None:
        super().__init__(cfg, num_threads, data)
        self.cfg = cfg

    def run_batch(
        self, messages: list[Message], contexts: dict[int, Context], max_batch: int | None
    ) -> list[tuple[Message, RecordDict | None]]:
        """Each message's reply and its client's updated state (``None`` for a failed client)."""
        from fedsim.batched import train_batch

        replies = train_batch(messages, contexts, self.cfg, max_batch)
        return [
            (r, None if r.has_error() else contexts[m.metadata.dst_node_id].state)
            for m, r in zip(messages, replies, strict=True)
        ]


def split(items: list[Any], parts: int) -> list[list[Any]]:
    """``items`` in ``parts`` contiguous chunks of near-equal size (no empty chunk)."""
    parts = max(1, min(parts, len(items)))
    q, r = divmod(len(items), parts)
    out, pos = [], 0
    for i in range(parts):
        n = q + (1 if i < r else 0)
        out.append(items[pos : pos + n])
        pos += n
    return out


class BatchedRayGrid(RayGrid):
    """Train Messages: one batch per actor; anything else: per client, as :class:`RayGrid`."""

    actor_class = BatchedClientActor

    def __init__(self, cfg: dict[str, Any], num_clients: int, data: Any = None) -> None:
        from fedsim.engines.batched import check_config

        check_config(cfg)  # before any actor starts
        super().__init__(cfg, num_clients, data)
        self.max_batch = cfg["engine"].get("max_batch")

    def dispatch(self, messages: list[Message], timeout: float | None) -> dict[str, Message]:  # noqa: D102
        from flwr.app import ConfigRecord

        from fedsim.batched import batched_form
        from fedsim.local import get_local_algorithm

        train = [m for m in messages if m.metadata.message_type.startswith(MessageType.TRAIN)]
        rest = [m for m in messages if not m.metadata.message_type.startswith(MessageType.TRAIN)]
        out = super().dispatch(rest, timeout) if rest else {}
        if not train:
            return out
        for m in train:  # refuse an unbatchable local algorithm here, before any actor trains
            batched_form(get_local_algorithm(m.content.config_records.get("config", ConfigRecord())))
        for _ in range(self.size - len(self.actors) - len(self._starting)):  # replace lost actors
            self._start_actor()
        if self._starting:  # wait for replacements: a batch round needs the whole pool
            for ref, actor in list(self._starting.items()):
                try:
                    ray.get(ref)
                    self.actors.append(actor)
                except ray.exceptions.RayError:
                    pass
            self._starting.clear()
        if not self.actors:
            raise RuntimeError("ray engine: no client actor is left alive")
        chunks = split(train, len(self.actors))
        calls = {}
        for actor, chunk in zip(self.actors, chunks):
            ctxs = {m.metadata.dst_node_id: self.contexts[m.metadata.dst_node_id] for m in chunk}
            calls[actor.run_batch.remote(chunk, ctxs, self.max_batch)] = (actor, chunk)
        done, late = ray.wait(list(calls), num_returns=len(calls), timeout=timeout)
        for ref in late:
            actor, chunk = calls[ref]
            for m in chunk:
                out[m.metadata.message_id] = error_reply(m, CLIENT_TIMEOUT, f"batch not done within timeout={timeout}s")
            ray.kill(actor, no_restart=True)
            self.actors.remove(actor)
        for ref in done:
            actor, chunk = calls[ref]
            try:
                results = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                for m in chunk:
                    out[m.metadata.message_id] = error_reply(m, ACTOR_DIED, f"client actor died: {err}")
                self.actors.remove(actor)
                continue
            except ray.exceptions.RayError as err:
                cause = getattr(err, "cause", None)
                from fedsim.config import ConfigError

                if isinstance(cause, ConfigError):
                    raise cause from None
                for m in chunk:
                    out[m.metadata.message_id] = error_reply(m, CLIENT_EXCEPTION, f"{type(err).__name__}: {err}")
                continue
            for m, (reply, state) in zip(chunk, results, strict=True):
                if state is not None:
                    self.contexts[m.metadata.dst_node_id].state = state
                out[m.metadata.message_id] = reply
        return out
