"""Pieces shared by the in-process grids (inline, Ray)."""

from __future__ import annotations

import traceback
import uuid
from abc import abstractmethod
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

CLIENT_EXCEPTION = 902
CLIENT_TIMEOUT = 903


NODE_ID_OFFSET = 1 << 20  # node ids of in-process engines: offset + partition id


def node_id_of(pid: int) -> int:
    """In-process engines number nodes ``NODE_ID_OFFSET + partition-id`` (clear of the
    SuperLink's id 1). Nothing relies on this: the server learns the map by querying."""
    return NODE_ID_OFFSET + pid


def set_server_identity(run_id: int = 1) -> None:
    """Flower builds Messages from the process's TaskIdentity; in-process engines set it
    as Flower's own ServerApp runtime does."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def make_context(pid: int, num_clients: int) -> Context:
    """A fresh node Context: partition id in node_config, empty private state."""
    return Context(
        run_id=1,
        node_id=node_id_of(pid),
        node_config={"partition-id": pid, "num-partitions": num_clients},
        state=RecordDict(),
        run_config={},
    )


def client_threads(cfg: dict) -> int:
    """Torch threads per client worker process (a Ray or Flower actor): ``client.num_threads``;
    ``"auto"`` (the default) is 1 (:mod:`fedsim.threads`); ``0`` is what the inline engine would
    use (this process's count), because the thread count changes how matrix products are summed
    and so the last bits of results."""
    import torch

    from fedsim.threads import resolve_threads

    return resolve_threads(cfg["client"].get("num_threads"), worker=True) or torch.get_num_threads()


def warm_up(cfg: dict) -> None:
    """Build this process's client runtime and run one no-op SGD step (lr=0) on it.

    The first ``torch.optim.SGD`` of a process imports torch's compiler stack (seconds), which
    would otherwise be charged to the first client served, against ``engine.client_timeout``.
    The model's weights are untouched (lr=0) and every client call reloads them anyway.
    """
    import torch

    from fedsim.client import get_runtime

    rt = get_runtime(cfg)
    x, y = rt.data.client(0)
    if len(y) == 0:
        return
    model = rt.model
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = torch.nn.functional.cross_entropy(model(x[:2].to(rt.device)), y[:2].to(rt.device))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


class LocalGrid(Grid):
    """Grid plumbing shared by the in-process engines (inline, Ray).

    One Context per partition lives here, on the driver, so a client's ``context.state``
    survives whichever worker serves it next. Subclasses implement :meth:`dispatch`.
    """

    def __init__(self, num_clients: int) -> None:
        self.contexts = {node_id_of(p): make_context(p, num_clients) for p in range(num_clients)}
        self._replies: dict[str, Message] = {}
        self._run = None

    @abstractmethod
    def dispatch(self, messages: list[Message], timeout: float | None) -> dict[str, Message]:
        """Deliver stamped messages; return ``{message_id: reply}`` (errors as error replies)."""

    def set_run(self, run):  # noqa: ANN001, D102
        self._run = run

    @property
    def run(self):  # noqa: D102
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver every message now (blocking); replies wait for ``pull_messages``."""
        messages = list(messages)
        ids = [stamp(m) for m in messages]
        self._replies.update(self.dispatch(messages, None))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:  # noqa: D102
        messages = list(messages)
        ids = [stamp(m) for m in messages]
        self._replies.update(self.dispatch(messages, timeout))
        return self.pull_messages(ids)


def stamp(msg: Message) -> str:
    """Give a message the id a real link would (Flower leaves it empty until pushed)."""
    mid = uuid.uuid4().hex
    msg.metadata.__dict__["_message_id"] = mid
    return mid


def error_reply(msg: Message, code: int, exc: BaseException | str) -> Message:
    """An error reply naming the exception (kept short; full trace in the reason tail)."""
    if isinstance(exc, BaseException):
        reason = f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc)[-3:])
    else:
        reason = exc
    return Message(Error(code, reason), reply_to=msg)


__all__ = ["set_server_identity", "node_id_of", "make_context", "stamp", "error_reply", "client_threads", "warm_up"]
